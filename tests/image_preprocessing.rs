//! Image preprocessing against the oracle (shared spec: multimodal §1.1): our decoder, target
//! size, bicubic resize, rescale and patches against Hugging Face's `Gemma4ImageProcessorPil`
//! (transformers 5.23.0, Pillow 13.0.0) as `golden/vision_preprocessing.py` recorded it in
//! `golden/image_preprocessing/`, for every image at every budget (70 … 1120):
//!
//! - PNG (RGB, RGBA, LA, palette with tRNS, grey, 16-bit grey), GIF (first frame, transparent
//!   index) and lossy WebP: **bit-exact** — the decoded RGB, the resized bytes, the float32
//!   `pixel_values` and the positions have HF's sha256, and the stored rows are equal;
//! - JPEG: the geometry is exact, the pixels within [`JPEG_TOLERANCE_LEVELS`] (the `image`
//!   crate's zune-jpeg decoder is not Pillow's libjpeg-turbo; justified at the constant);
//! - Pillow's resize alone on noise images, element by element (`resize_cases`);
//! - the golden vision cases: our pixels from their PNGs are exactly HF's
//!   `pixel_values.safetensors`, and `gemma4 dump --image` equals `gemma4 dump --pixel-values`
//!   bit for bit (so it conforms to the expected `vision.*` tensors exactly as well).
//!
//! A failure names the image, the budget and the worst element.

mod common;

use std::path::{Path, PathBuf};

use gemma4_reference::vision::preprocessing::{
    load_image, patchify, preprocess, resize_bicubic, resized_size, ImagePatches, RgbImage,
    PATCH_SIZE, PATCH_VALUES, SUPPORTED_BUDGETS,
};
use gemma4_reference::ActivationDump;
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};

use common::{golden_case, golden_dir, read_json, run_gemma4};

/// Largest difference, in levels of 255, allowed between our pixels of a JPEG and HF's.
///
/// The decoders differ: zune-jpeg (the `image` crate) and libjpeg-turbo (Pillow) use different
/// IDCT and chroma-upsampling arithmetic (both within the JPEG standard's accuracy, which does
/// not fix the output bits). Measured on `astronaut_jpeg` (quality 90, 4:2:0, 256×256): the
/// decoded RGB differs by at most 4 levels (16% of the values differ at all); after the resize,
/// at every budget, also by at most 4 levels (about 21% of the values off by one or more). HF's
/// side is exact here: our preprocessing of Pillow's decoded RGB has HF's sha256. 6 levels
/// leaves room for another decoder version's rounding while still failing on real errors (a
/// colour-conversion or upsampling mistake moves values by tens of levels).
const JPEG_TOLERANCE_LEVELS: u8 = 6;

// ------------------------------------------------------------------------------------------------
// The fixture
// ------------------------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    golden_dir().join("image_preprocessing")
}

fn manifest() -> Value {
    read_json(&fixture_dir().join("manifest.json"))
}

fn images() -> Vec<Value> {
    manifest()["images"]
        .as_array()
        .expect("manifest.json: images")
        .clone()
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("manifest: `{key}` is not a string in {value}"))
}

fn number(value: &Value, key: &str) -> usize {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("manifest: `{key}` is not a number in {value}")) as usize
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One safetensors file of the fixture, read whole.
struct Tensors(Vec<u8>);

impl Tensors {
    fn read(path: &Path) -> Self {
        Tensors(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.0).expect("valid safetensors")
    }

    fn has(&self, name: &str) -> bool {
        self.parsed().names().contains(&name)
    }

    fn bytes(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let parsed = self.parsed();
        let view = parsed
            .tensor(name)
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        (view.shape().to_vec(), view.data().to_vec())
    }

    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, data) = self.bytes(name);
        let values = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (shape, values)
    }

    fn u32s(&self, name: &str) -> Vec<u32> {
        let (_, data) = self.bytes(name);
        data.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn i64s(&self, name: &str) -> Vec<i64> {
        let (_, data) = self.bytes(name);
        data.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

// ------------------------------------------------------------------------------------------------
// Comparisons that name the worst element
// ------------------------------------------------------------------------------------------------

/// The largest level difference between two RGB images of the same size, where it is and how
/// many values differ: `(max, pixel x, pixel y, channel, count)`.
fn level_difference(ours: &RgbImage, theirs: &RgbImage) -> (u8, usize, usize, usize, usize) {
    assert_eq!(
        (ours.width, ours.height),
        (theirs.width, theirs.height),
        "image sizes differ"
    );
    let mut worst = (0u8, 0usize);
    let mut count = 0;
    for (i, (a, b)) in ours.pixels.iter().zip(&theirs.pixels).enumerate() {
        let d = a.abs_diff(*b);
        if d > 0 {
            count += 1;
        }
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let pixel = worst.1 / 3;
    (
        worst.0,
        pixel % ours.width,
        pixel / ours.width,
        worst.1 % 3,
        count,
    )
}

/// `Some(description)` of the worst element when two float slices (rows of 768) differ.
fn rows_differ(ours: &[f32], theirs: &[f32], first_row: usize) -> Option<String> {
    if ours.len() != theirs.len() {
        return Some(format!("{} values, expected {}", ours.len(), theirs.len()));
    }
    let (mut worst, mut at, mut count) = (0.0f32, 0usize, 0usize);
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if a.to_bits() != b.to_bits() {
            count += 1;
            let d = (a - b).abs();
            if d > worst || d.is_nan() {
                (worst, at) = (d, i);
            }
        }
    }
    (count > 0).then(|| {
        let (row, column) = (first_row + at / PATCH_VALUES, at % PATCH_VALUES);
        let (r, c, ch) = (column / 3 / PATCH_SIZE, column / 3 % PATCH_SIZE, column % 3);
        format!(
            "{count} values differ; worst at [patch {row}, {column}] (row {r}, column {c}, channel \
             {ch} of the patch): ours {} (level {:.0}), HF {} (level {:.0})",
            ours[at],
            ours[at] * 255.0,
            theirs[at],
            theirs[at] * 255.0
        )
    })
}

/// The uint8 levels of patch `p` (768 values, the patch's flat order).
fn patch_levels(patches: &ImagePatches, p: usize) -> Vec<u8> {
    patches
        .pixel_values
        .row(p)
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect()
}

/// `Σ_k level[k]·(k + 1)` of every patch, as `vision_preprocessing.py`'s `patch_sums`.
fn patch_sums(patches: &ImagePatches) -> Vec<u32> {
    (0..patches.positions.len())
        .map(|p| {
            patch_levels(patches, p)
                .iter()
                .enumerate()
                .map(|(k, &l)| u32::from(l) * (k as u32 + 1))
                .sum()
        })
        .collect()
}

fn f32_le_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn positions_le_bytes(patches: &ImagePatches) -> Vec<u8> {
    patches
        .positions
        .iter()
        .flat_map(|[x, y]| [*x as i64, *y as i64])
        .flat_map(i64::to_le_bytes)
        .collect()
}

/// Everything our `preprocess` gives for one budget, against the manifest's record and the
/// stored tensors. Returns the problems found (empty when bit-exact).
fn check_budget(name: &str, rgb: &RgbImage, record: &Value, tensors: &Tensors) -> Vec<String> {
    let budget = number(record, "budget");
    let at = format!("{name} at B={budget}");
    let mut problems = Vec::new();
    let expected_size = (
        number(record, "resized_height"),
        number(record, "resized_width"),
    );
    let size = resized_size(rgb.height, rgb.width, budget).expect("supported budget");
    if size != expected_size {
        return vec![format!(
            "{at}: resized to {size:?} (H', W'), HF {expected_size:?}"
        )];
    }
    let patches = preprocess(rgb, budget).expect("preprocess");
    let skipped = size == (rgb.height, rgb.width);
    if skipped != record["resize_skipped"].as_bool().unwrap() {
        problems.push(format!("{at}: resize skipped {skipped}, HF the opposite"));
    }
    if patches.soft_tokens != number(record, "soft_tokens")
        || patches.positions.len() != number(record, "num_patches")
    {
        problems.push(format!(
            "{at}: {} patches, {} soft tokens; HF {} and {}",
            patches.positions.len(),
            patches.soft_tokens,
            number(record, "num_patches"),
            number(record, "soft_tokens")
        ));
        return problems;
    }
    if sha256_hex(&positions_le_bytes(&patches)) != text(record, "positions_sha256") {
        problems.push(format!("{at}: positions differ from HF's"));
    }
    // The resized bytes (what Pillow's resize made), then the float32 patches.
    let resized = if skipped {
        rgb.clone()
    } else {
        resize_bicubic(rgb, size.1, size.0)
    };
    assert_eq!(
        patchify(&resized).unwrap(),
        patches,
        "{at}: preprocess is resize + patchify"
    );
    let resized_equal = sha256_hex(&resized.pixels) == text(record, "resized_rgb_sha256");
    let values_equal = sha256_hex(&f32_le_bytes(patches.pixel_values.iter().copied()))
        == text(record, "pixel_values_sha256");
    if !resized_equal || !values_equal {
        // Locate it: the per-patch sums, then the stored rows.
        let theirs = tensors.u32s(&format!("b{budget}.patch_sums"));
        let ours = patch_sums(&patches);
        let differing: Vec<usize> = (0..ours.len()).filter(|&p| ours[p] != theirs[p]).collect();
        let mut detail = format!(
            "{at}: pixels differ from HF's (resized bytes {}, pixel_values {}; pass order \
             {}); {} of {} patches differ",
            if resized_equal { "equal" } else { "differ" },
            if values_equal { "equal" } else { "differ" },
            text(record, "pass_order"),
            differing.len(),
            ours.len()
        );
        if let Some(&p) = differing.first() {
            detail += &format!(
                ", the first patch {p} at (x, y) = {:?}",
                patches.positions[p]
            );
        }
        problems.push(detail);
    }
    let n = patches.positions.len();
    let values = patches.pixel_values.as_slice().unwrap();
    for (suffix, first_row) in [("head", 0), ("tail", n - 3)] {
        let (_, expected) = tensors.f32s(&format!("b{budget}.pixel_values_{suffix}"));
        let ours = &values[first_row * PATCH_VALUES..(first_row + 3) * PATCH_VALUES];
        if let Some(d) = rows_differ(ours, &expected, first_row) {
            problems.push(format!("{at}, rows {suffix}: {d}"));
        }
    }
    if budget == 70 && tensors.has("b70.pixel_values_levels") {
        let (_, levels) = tensors.bytes("b70.pixel_values_levels");
        let expected: Vec<f32> = levels
            .iter()
            .map(|&l| (f64::from(l) * (1.0 / 255.0)) as f32)
            .collect();
        if let Some(d) = rows_differ(values, &expected, 0) {
            problems.push(format!("{at}, every row: {d}"));
        }
        let positions: Vec<i64> = patches
            .positions
            .iter()
            .flat_map(|[x, y]| [*x as i64, *y as i64])
            .collect();
        if positions != tensors.i64s("b70.positions") {
            problems.push(format!("{at}: positions differ from the stored ones"));
        }
    }
    problems
}

// ------------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------------

#[test]
fn image_preprocessing_fixture_covers_every_kind() {
    let manifest = manifest();
    let budgets: Vec<usize> = manifest["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(budgets, SUPPORTED_BUDGETS, "every budget is recorded");
    let images = images();
    let modes: Vec<&str> = images.iter().map(|i| text(i, "pil_mode")).collect();
    for mode in ["RGB", "RGBA", "LA", "P", "L", "I;16"] {
        assert!(modes.contains(&mode), "no image of Pillow mode {mode}");
    }
    let files: Vec<&str> = images.iter().map(|i| text(i, "file")).collect();
    for extension in [".png", ".jpg", ".webp", ".gif"] {
        assert!(
            files.iter().any(|f| f.ends_with(extension)),
            "no {extension} image"
        );
    }
    let records: Vec<(&Value, &Value)> = images
        .iter()
        .flat_map(|i| i["budgets"].as_array().unwrap().iter().map(move |b| (i, b)))
        .collect();
    for image in &images {
        assert_eq!(image["budgets"].as_array().unwrap().len(), 5);
        assert!(!text(image, "licence").is_empty());
    }
    let upscaled = |(i, b): &(&Value, &Value)| {
        number(b, "resized_width") > number(i, "width")
            && number(b, "resized_height") > number(i, "height")
    };
    assert!(records.iter().any(upscaled), "no up-scaled image");
    assert!(
        records.iter().any(|(_, b)| b["resize_skipped"] == true),
        "no image whose resize is skipped"
    );
    for order in ["vertical_first", "horizontal_first"] {
        assert!(
            records.iter().any(|(_, b)| b["pass_order"] == order),
            "no resize with pass order {order}"
        );
    }
    assert!(
        images
            .iter()
            .any(|i| text(i, "file").ends_with(".gif") && i["pil_transparency"] == true),
        "no GIF with a transparent index"
    );
}

#[test]
fn image_preprocessing_decode_matches_pillow_lossless() {
    // PNG in every mode, GIF and lossy WebP: the RGB after HF's `convert_to_rgb`, bit for bit.
    let mut problems = Vec::new();
    for image in images()
        .iter()
        .filter(|i| !text(i, "file").ends_with(".jpg"))
    {
        let name = text(image, "name");
        let ours = load_image(&fixture_dir().join(text(image, "file"))).expect("decodes");
        assert_eq!(
            (ours.width, ours.height),
            (number(image, "width"), number(image, "height")),
            "{name}: size"
        );
        if sha256_hex(&ours.pixels) == text(image, "rgb_sha256") {
            continue;
        }
        let mut problem = format!("{name}: decoded RGB differs from Pillow's");
        if let Some(file) = image["pil_rgb_file"].as_str() {
            let theirs = load_image(&fixture_dir().join(file)).unwrap();
            let (max, x, y, ch, count) = level_difference(&ours, &theirs);
            problem += &format!(
                ": {count} values, worst {max} levels at pixel (x {x}, y {y}) channel {ch}"
            );
        }
        problems.push(problem);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn image_preprocessing_every_budget_bit_exact_png_gif_webp() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for image in images()
        .iter()
        .filter(|i| !text(i, "file").ends_with(".jpg"))
    {
        let name = text(image, "name");
        let rgb = load_image(&fixture_dir().join(text(image, "file"))).expect("decodes");
        let tensors = Tensors::read(&fixture_dir().join(format!("tensors/{name}.safetensors")));
        for record in image["budgets"].as_array().unwrap() {
            problems.extend(check_budget(name, &rgb, record, &tensors));
            checked += 1;
        }
    }
    assert!(checked >= 15 * 5, "only {checked} image budgets checked");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn image_preprocessing_jpeg_within_decoder_tolerance() {
    let mut problems = Vec::new();
    let mut jpegs = 0;
    for image in images()
        .iter()
        .filter(|i| text(i, "file").ends_with(".jpg"))
    {
        jpegs += 1;
        let name = text(image, "name");
        let ours = load_image(&fixture_dir().join(text(image, "file"))).expect("decodes");
        // Pillow's decoded RGB, stored losslessly: what HF's processor started from.
        let pillow = load_image(&fixture_dir().join(text(image, "pil_rgb_file"))).unwrap();
        assert_eq!(
            sha256_hex(&pillow.pixels),
            text(image, "rgb_sha256"),
            "{name}: the stored Pillow RGB is HF's"
        );
        let (max, x, y, ch, count) = level_difference(&ours, &pillow);
        eprintln!(
            "{name}: decoded RGB vs Pillow's: max {max} levels at (x {x}, y {y}) channel {ch}, \
             {count} of {} values differ",
            ours.pixels.len()
        );
        if max > JPEG_TOLERANCE_LEVELS {
            problems.push(format!(
                "{name}: decoded RGB differs from Pillow's by {max} levels at (x {x}, y {y}) \
                 channel {ch}"
            ));
        }
        let tensors = Tensors::read(&fixture_dir().join(format!("tensors/{name}.safetensors")));
        for record in image["budgets"].as_array().unwrap() {
            let budget = number(record, "budget");
            // From Pillow's RGB our preprocessing is HF's, bit for bit ...
            problems.extend(check_budget(name, &pillow, record, &tensors));
            // ... so the difference from our own decode is the decoder's, through the resize.
            let hf = preprocess(&pillow, budget).unwrap();
            let from_jpeg = preprocess(&ours, budget).unwrap();
            assert_eq!(from_jpeg.positions, hf.positions, "{name} B={budget}");
            let (mut worst, mut at, mut count) = (0u8, 0usize, 0usize);
            for (i, (a, b)) in from_jpeg
                .pixel_values
                .iter()
                .zip(hf.pixel_values.iter())
                .enumerate()
            {
                let d = ((a * 255.0).round() as u8).abs_diff((b * 255.0).round() as u8);
                count += usize::from(d > 0);
                if d > worst {
                    (worst, at) = (d, i);
                }
            }
            let (patch, column) = (at / PATCH_VALUES, at % PATCH_VALUES);
            eprintln!(
                "{name} B={budget}: pixel_values vs HF: max {worst} levels at [{patch}, {column}], \
                 {count} of {} values differ",
                hf.pixel_values.len()
            );
            if worst > JPEG_TOLERANCE_LEVELS {
                problems.push(format!(
                    "{name} B={budget}: pixel_values differ from HF's by {worst} levels (more \
                     than {JPEG_TOLERANCE_LEVELS}) at [patch {patch}, {column}]"
                ));
            }
        }
    }
    assert!(jpegs > 0, "no JPEG in the fixture");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn image_preprocessing_resize_matches_pillow() {
    let tensors = Tensors::read(&fixture_dir().join("tensors/resize_cases.safetensors"));
    let cases = manifest()["resize_cases"].as_array().unwrap().clone();
    assert!(cases.len() >= 30, "{} resize cases", cases.len());
    let mut problems = Vec::new();
    for case in &cases {
        let source_file = text(case, "source");
        let source = load_image(&fixture_dir().join(source_file)).unwrap();
        let (width, height) = (number(case, "width"), number(case, "height"));
        let ours = resize_bicubic(&source, width, height);
        let stem = Path::new(source_file)
            .file_stem()
            .unwrap()
            .to_string_lossy();
        let (shape, expected) = tensors.bytes(&format!("{stem}.{width}x{height}"));
        assert_eq!(shape, [height, width, 3]);
        let theirs = RgbImage::new(width, height, expected).unwrap();
        let sha_equal = sha256_hex(&ours.pixels) == text(case, "resized_rgb_sha256");
        if ours != theirs || !sha_equal {
            let (max, x, y, ch, count) = level_difference(&ours, &theirs);
            problems.push(format!(
                "{stem} ({}x{}) -> {width}x{height} (Pillow's pass order {}): {count} values \
                 differ, worst {max} levels at pixel (x {x}, y {y}) channel {ch}",
                source.width,
                source.height,
                text(case, "pass_order")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ------------------------------------------------------------------------------------------------
// The golden vision cases: soft tokens from our own pixels
// ------------------------------------------------------------------------------------------------

const VISION_CASES: [&str; 4] = [
    "e2b_vision",
    "e2b_vision_two_images",
    "31b_vision",
    "31b_vision_two_images",
];

#[test]
fn image_preprocessing_golden_case_pixels_from_png() {
    for case_name in VISION_CASES {
        let case = golden_case(case_name);
        let prompt = case.prompt().expect("pixel values readable");
        assert_eq!(prompt.images.len(), case.images.len());
        for (i, (image, theirs)) in case.images.iter().zip(&prompt.images).enumerate() {
            let at = format!("{case_name}, image {i} ({})", image.file.display());
            let ours = preprocess(
                &load_image(&case.dir.join(&image.file)).expect("decodes"),
                image.budget,
            )
            .unwrap();
            assert_eq!(
                [ours.resized_height, ours.resized_width],
                image.resized,
                "{at}"
            );
            assert_eq!(ours.soft_tokens, image.soft_tokens, "{at}");
            assert_eq!(ours.positions, theirs.positions, "{at}: positions");
            if let Some(d) = rows_differ(
                ours.pixel_values.as_slice().unwrap(),
                theirs.pixel_values.as_slice().unwrap(),
                0,
            ) {
                panic!("{at}: our pixels differ from HF's pixel_values.safetensors: {d}");
            }
        }
    }
}

/// `gemma4 dump` of a golden vision case with `media` (`--image ...` or `--pixel-values F`).
fn dump_case(case: &gemma4::golden::GoldenCase, media: &[String], out: &Path) -> ActivationDump {
    let tokens = case
        .tokens
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let model = case.model_dir().to_string_lossy().into_owned();
    let decode = case.decode_steps.to_string();
    let out_arg = out.to_string_lossy().into_owned();
    let mut args = vec![
        "dump", "--model", &model, "--tokens", &tokens, "--decode", &decode, "--out", &out_arg,
    ];
    args.extend(media.iter().map(String::as_str));
    let (code, _, stderr) = run_gemma4(&args, &[]);
    assert_eq!(code, 0, "gemma4 {}: {stderr}", args.join(" "));
    ActivationDump::read(out).expect("dump readable")
}

#[test]
fn image_preprocessing_cli_image_equals_pixel_values_golden_cases() {
    let scratch = tempfile::tempdir().unwrap();
    for case_name in VISION_CASES {
        let case = golden_case(case_name);
        let budgets: Vec<usize> = case.images.iter().map(|i| i.budget).collect();
        assert!(
            budgets.iter().all(|&b| b == budgets[0]),
            "{case_name}: one budget"
        );
        let mut with_images = vec!["--image-budget".to_string(), budgets[0].to_string()];
        for image in &case.images {
            with_images.push("--image".into());
            with_images.push(case.dir.join(&image.file).to_string_lossy().into_owned());
        }
        let with_pixels = vec![
            "--pixel-values".to_string(),
            case.pixel_values
                .as_ref()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        ];
        let from_png = dump_case(&case, &with_images, &scratch.path().join("image.st"));
        let from_pixels = dump_case(&case, &with_pixels, &scratch.path().join("pixels.st"));

        // The same pixels, so the same dump, bit for bit.
        assert_eq!(
            from_png.names_in_model_order(),
            from_pixels.names_in_model_order(),
            "{case_name}: tensor names"
        );
        let mut vision_tensors = 0;
        for name in from_png.names_in_model_order() {
            vision_tensors += usize::from(name.starts_with("vision"));
            let (a, b) = (from_png.get(name).unwrap(), from_pixels.get(name).unwrap());
            if a != b {
                let (a, b) = (a.to_f64(), b.to_f64());
                let (worst, at) = a
                    .iter()
                    .zip(b.iter())
                    .map(|(x, y)| (x - y).abs())
                    .enumerate()
                    .fold((0.0, 0), |w, (i, d)| if d > w.0 { (d, i) } else { w });
                panic!(
                    "{case_name}: {name} from --image differs from --pixel-values by {worst:.3e} \
                     at flat index {at}"
                );
            }
        }
        assert!(vision_tensors > 0, "{case_name}: no vision tensors dumped");

        // And it conforms to the oracle's dump with the usual tolerances.
        let expected = ActivationDump::read(&case.expected_path()).unwrap();
        let reports = gemma4::conform::compare_with_case(&case, &expected, &from_png);
        let failures: Vec<String> = reports
            .iter()
            .filter(|r| r.status != gemma4::comparison::Status::Pass)
            .map(|r| r.describe())
            .collect();
        assert!(
            failures.is_empty(),
            "{case_name} from --image:\n{}",
            failures.join("\n")
        );
        assert!(
            reports.iter().any(|r| r.name.starts_with("vision")),
            "{case_name}: no vision tensor compared"
        );
    }
}
