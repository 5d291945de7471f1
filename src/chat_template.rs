//! The checkpoint's chat template, rendered with `minijinja` as Hugging Face's
//! `apply_chat_template(messages, add_generation_prompt=True)` renders it with jinja2: the same
//! context (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `enable_thinking`), the
//! same environment settings (`trim_blocks`, `lstrip_blocks`, no trailing newline kept), HF's
//! `raise_exception` and `strftime_now`, Python string methods (`minijinja-contrib`'s pycompat).
//!
//! The template comes from `chat_template.jinja` next to the weights (transformers 5 writes it
//! there) or else from `chat_template` in `tokenizer_config.json` (a string, or a list of named
//! templates of which `default` is used).

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error, ErrorKind};
use serde_json::{json, Value};

/// A chat template and where it came from.
pub struct ChatTemplate {
    source: String,
    /// The file it was read from (for messages).
    pub path: PathBuf,
}

/// What a rendering needs besides the messages.
#[derive(Clone, Debug)]
pub struct RenderOptions {
    /// End with the opening of the model's turn (what `generate --chat` always wants).
    pub add_generation_prompt: bool,
    /// Gemma 4's thinking switch (`enable_thinking`): on, the system turn starts with `<|think|>`;
    /// off, the generation prompt closes an empty thought channel.
    pub enable_thinking: bool,
    /// The tokenizer's BOS and EOS strings (`bos_token`, `eos_token` in the template).
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// Reads the template of the checkpoint in `dir`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let file = dir.join("chat_template.jinja");
        if file.exists() {
            let source =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            return Ok(ChatTemplate { source, path: file });
        }
        let config = dir.join("tokenizer_config.json");
        let missing = || {
            format!(
                "{}: no chat template (neither this file nor `chat_template` in {}); send the prompt as text without --chat",
                file.display(),
                config.display()
            )
        };
        let text = std::fs::read_to_string(&config).map_err(|_| missing())?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not JSON: {e}", config.display()))?;
        let source = match value.get("chat_template") {
            None | Some(Value::Null) => return Err(missing()),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| {
                    format!(
                        "{}: `chat_template` is a list without a `default` template",
                        config.display()
                    )
                })?,
            Some(other) => {
                return Err(format!(
                    "{}: `chat_template` should be a string, found {}",
                    config.display(),
                    kind_of(other)
                ))
            }
        };
        Ok(ChatTemplate {
            source,
            path: config,
        })
    }

    /// A template from its source (tests).
    pub fn from_source(source: &str) -> Self {
        ChatTemplate {
            source: source.to_string(),
            path: PathBuf::from("<template>"),
        }
    }

    /// Renders `messages` (a JSON array of `{role, content}`, content a string or a list of
    /// parts `{type: text|image|audio, …}`). A template error (syntax, `raise_exception`, an
    /// unknown role the template rejects) names the template's file.
    pub fn render(&self, messages: &Value, options: &RenderOptions) -> Result<String, String> {
        let fail = |e: Error| {
            format!(
                "{}: the chat template failed: {}",
                self.path.display(),
                describe(&e)
            )
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| -> String {
            strftime_now(&format)
        });
        env.add_template("chat", &self.source).map_err(fail)?;
        let context = json!({
            "messages": messages,
            "add_generation_prompt": options.add_generation_prompt,
            "enable_thinking": options.enable_thinking,
            "bos_token": options.bos_token,
            "eos_token": options.eos_token,
        });
        env.get_template("chat")
            .and_then(|t| t.render(minijinja::Value::from_serialize(&context)))
            .map_err(fail)
    }
}

/// An error with its chain of causes (minijinja puts the template's own message last).
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Today's date (UTC) in the `strftime` formats chat templates use (`%d %b %Y`, `%Y-%m-%d`, …):
/// `%d %m %Y %y %b %B %H %M %S %%`; other directives are kept as written.
fn strftime_now(format: &str) -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let time = seconds.rem_euclid(86_400);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", time / 3600)),
            Some('M') => out.push_str(&format!("{:02}", time / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", time % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil-from-days).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> RenderOptions {
        RenderOptions {
            add_generation_prompt: true,
            enable_thinking: false,
            bos_token: "<bos>".into(),
            eos_token: "<eos>".into(),
        }
    }

    #[test]
    fn chat_template_raise_exception_and_syntax_errors_name_the_template() {
        let template =
            ChatTemplate::from_source("{{ raise_exception('no ' ~ messages[0]['role']) }}");
        let err = template
            .render(&json!([{"role": "tool", "content": "x"}]), &options())
            .unwrap_err();
        assert!(
            err.contains("<template>") && err.contains("no tool"),
            "{err}"
        );
        let broken = ChatTemplate::from_source("{% for m in messages %}");
        let err = broken.render(&json!([]), &options()).unwrap_err();
        assert!(err.contains("chat template failed"), "{err}");
    }

    #[test]
    fn chat_template_python_methods_and_dates() {
        let template = ChatTemplate::from_source(
            "{{ messages[0]['content'].strip().upper() }}|{{ strftime_now('%Y') | length }}",
        );
        let text = template
            .render(&json!([{"role": "user", "content": "  hi  "}]), &options())
            .unwrap();
        assert_eq!(text, "HI|4");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_428), (2025, 12, 6));
    }
}
