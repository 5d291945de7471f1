//! Parsing `--tokens 2,17,301`.

/// Parses a comma-separated list of token ids (spaces allowed). Errors name the bad entry.
pub fn parse_token_list(text: &str) -> Result<Vec<usize>, String> {
    let mut ids = Vec::new();
    for (index, piece) in text.split(',').enumerate() {
        let piece = piece.trim();
        if piece.is_empty() {
            if text.trim().is_empty() {
                return Err("the token list is empty".to_string());
            }
            return Err(format!("entry {index} of the token list is empty"));
        }
        let id: usize = piece.parse().map_err(|_| {
            format!("entry {index} of the token list, `{piece}`, is not a non-negative integer")
        })?;
        ids.push(id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_list_and_reject_garbage() {
        assert_eq!(parse_token_list("2, 17,301").unwrap(), vec![2, 17, 301]);
        assert!(parse_token_list("").unwrap_err().contains("empty"));
        assert!(parse_token_list("1,,2").unwrap_err().contains("entry 1"));
        assert!(parse_token_list("1,-2").unwrap_err().contains("`-2`"));
    }
}
