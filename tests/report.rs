//! `greyfed report` on a recorded run (`tests/data/recorded-run`: the
//! metrics.jsonl, run.json and summary.json of a 4-participant, 4-round
//! `greyfed simulate` with one participant crashing): every PNG decodes with
//! the expected size and real content, and the HTML has every section with
//! the pictures embedded. Also the errors for bad input.

mod common;

use std::path::{Path, PathBuf};

use common::greyfed;
use greyfed::report::base64;
use greyfed_coordinator::run_record::{ImageCipher, RunRecord};
use greyfed_participant::cipher::ImageKey;

/// The recorded run copied into a fresh directory, with a fresh image key in
/// `keys/ca/image.key` whose fingerprint `run.json`'s cipher is made to
/// name (the recording's own key is not kept).
fn recorded_run() -> (tempfile::TempDir, ImageKey) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/recorded-run");
    let dir = tempfile::tempdir().unwrap();
    for name in ["metrics.jsonl", "run.json", "summary.json"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    let key = ImageKey::from_bytes([42; 32]);
    std::fs::create_dir_all(dir.path().join("keys/ca")).unwrap();
    key.write_file(dir.path().join("keys/ca/image.key"))
        .unwrap();
    let mut run = RunRecord::read(dir.path()).unwrap().unwrap();
    run.key_fingerprint = Some(key.fingerprint());
    let Some(ImageCipher::Encrypted(cipher)) = &mut run.cipher else {
        panic!("the recorded run is encrypted: {:?}", run.cipher)
    };
    cipher.key_id = key.fingerprint();
    run.write(dir.path()).unwrap();
    (dir, key)
}

/// Decodes a PNG: width, height, and the number of distinct pixel values
/// in the whole picture and in its top 40 rows.
fn decode(path: &Path) -> (u32, u32, usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = info.color_type.samples();
    let distinct = |bytes: &[u8]| {
        bytes
            .chunks(bpp)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let row = info.line_size;
    (
        info.width,
        info.height,
        distinct(&buf[..info.buffer_size()]),
        distinct(&buf[..row * 40.min(info.height as usize)]),
    )
}

fn run_report(args: &[&std::ffi::OsStr]) -> std::process::Output {
    greyfed().arg("report").args(args).output().unwrap()
}

#[test]
fn a_recorded_run_renders_to_pngs_and_one_self_contained_html_page() {
    let (dir, key) = recorded_run();
    let out = run_report(&[dir.path().as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report = dir.path().join("report");
    let html_path = report.join("report.html");
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("report: {}", html_path.display())
    );

    // Every plot: the plot size, many colours (lines, legend, anti-aliased
    // text), and text in the title band, so the embedded font rendered.
    for name in ["accuracy", "loss", "bytes", "stages", "survivors"] {
        let (w, h, colours, title_colours) = decode(&report.join(format!("{name}.png")));
        assert_eq!((w, h), (960, 480), "{name}");
        assert!(colours > 20, "{name}: {colours} colours");
        assert!(title_colours > 5, "{name}: no title text drawn");
    }
    // The sample grid: a plain row and the cipher | attack | fold row of
    // 6 images of 28x28 pixels at twice the size (preview's layout).
    let (w, h, greys, _) = decode(&report.join("samples.png"));
    let tile = 28 * 2 + 2;
    assert_eq!((w, h), (3 * 6 * tile + 2 * 8 + 2, 2 * tile + 2));
    assert!(greys > 50, "{greys} grey levels");

    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    for id in [
        "summary",
        "parameters",
        "accuracy",
        "loss",
        "bytes",
        "stages",
        "survivors",
        "samples",
        "rounds",
    ] {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "{id}");
    }
    // Self-contained: each PNG is embedded, nothing is linked.
    for png in std::fs::read_dir(&report).unwrap() {
        let path: PathBuf = png.unwrap().path();
        if path.extension().is_some_and(|e| e == "png") {
            let data = base64(&std::fs::read(&path).unwrap());
            assert!(
                html.contains(&format!("data:image/png;base64,{data}\"")),
                "{} not embedded",
                path.display()
            );
        }
    }
    assert_eq!(html.matches("<img src=\"data:image/png;base64,").count(), 6);
    // The attack table of many images is pointed to (it is not run here).
    assert!(html.contains("greyfed experiment attacks"));
    assert!(!html.contains("src=\"http") && !html.contains("<link"));
    // The parameters and one table row per round.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let rounds = metrics.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(rounds >= 3);
    let table = &html[html.find("<section id=\"rounds\">").unwrap()..];
    assert_eq!(table.matches("<tr><td>").count(), rounds);
    for text in ["--cipher", "--local-epochs", "secagg+", "blocknet"] {
        assert!(html.contains(text), "{text}");
    }
    // The key's fingerprint may appear, the key never.
    assert!(html.contains(&key.fingerprint()));
    assert!(!html.contains(&key.expose_secret_hex()));
    assert!(
        !stdout.contains(&key.expose_secret_hex()) && !stderr.contains(&key.expose_secret_hex())
    );
}

#[test]
fn without_the_key_the_report_says_why_it_has_no_samples() {
    let (dir, _) = recorded_run();
    std::fs::remove_file(dir.path().join("keys/ca/image.key")).unwrap();
    let out_dir = dir.path().join("elsewhere");
    let out = run_report(&[
        dir.path().as_os_str(),
        "--out".as_ref(),
        out_dir.as_os_str(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image key"));
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("No sample images: no image key at"), "note");
    assert_eq!(html.matches("<img src=\"data:image/png;base64,").count(), 5);
    assert!(!out_dir.join("samples.png").exists());
}

#[test]
fn bad_run_directories_are_clear_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let check = |expect: &str| {
        let out = run_report(&[dir.path().as_os_str()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{expect}");
        assert!(stderr.contains(expect), "{expect}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };
    check("metrics.jsonl not found");
    std::fs::write(dir.path().join("metrics.jsonl"), "\n").unwrap();
    check("holds no completed round");
    let good = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/recorded-run/metrics.jsonl"),
    )
    .unwrap();
    let first = good.lines().next().unwrap();
    std::fs::write(
        dir.path().join("metrics.jsonl"),
        format!("{first}\n{}\n", &first[..first.len() / 2]),
    )
    .unwrap();
    check("metrics.jsonl line 2: not a round record");
    std::fs::write(dir.path().join("metrics.jsonl"), format!("{first}\n")).unwrap();
    std::fs::write(dir.path().join("run.json"), "not json").unwrap();
    check("is not a greyfed run file");
}
