//! `report.html`: the page's sections, tables and escaping.

use std::fmt::Write as _;
use std::path::Path;

use greyfed_coordinator::metrics::RoundRecord;
use greyfed_coordinator::run_record::{ImageCipher, RunRecord};
use greyfed_coordinator::strategy::StrategyConfig;
use greyfed_protocol::model_file::ModelFile;
use greyfed_protocol::{LrSchedule, OptimizerSpec};

use super::{Figure, METRICS_FILE, RunJson, Samples, base64};

/// Escapes text for HTML element content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |a| format!("{:.2}%", 100.0 * a))
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.decimals$}"))
}

/// A two-column table of `rows`.
fn kv_table(rows: &[(String, String)]) -> String {
    let mut s = String::from("<table class=\"kv\">\n");
    for (k, v) in rows {
        let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    s.push_str("</table>\n");
    s
}

/// A `summary.json` value as one line of text for a table cell: seconds
/// and accuracies rounded, other values as they are.
fn summary_text(key: &str, v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "–".into(),
        serde_json::Value::Number(n) if key.ends_with("accuracy") => pct(n.as_f64()),
        serde_json::Value::Number(n) if key.ends_with("secs") => num(n.as_f64(), 1) + " s",
        other => other.to_string(),
    }
}

/// Width and height from a PNG's header.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    let word = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
    (png.get(12..16) == Some(b"IHDR")).then_some(())?;
    Some((word(16)?, word(20)?))
}

fn figure_html(s: &mut String, f: &Figure, extra: &str) {
    // The size lets a browser lay the page out before decoding the images.
    let size = png_size(&f.png)
        .map(|(w, h)| format!(" width=\"{w}\" height=\"{h}\""))
        .unwrap_or_default();
    let _ = write!(
        s,
        "<section id=\"{id}\">\n<h2>{title}</h2>\n<figure>\n<img src=\"data:image/png;base64,{data}\"{size} \
         alt=\"{title}\" data-file=\"{file}\">\n<figcaption>{caption}</figcaption>\n</figure>\n{extra}</section>\n",
        id = f.id,
        title = esc(f.title),
        data = base64(&f.png),
        file = esc(&f.file),
        caption = esc(&f.caption),
    );
}

/// A Markdown table (as [`crate::preview::render_preview`] writes its legend) as
/// HTML; other lines become paragraphs.
fn markdown_table_html(md: &str) -> String {
    let mut s = String::new();
    let mut in_table = false;
    let mut header = true;
    for line in md.lines() {
        let line = line.trim();
        if line.starts_with('|') {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells.iter().all(|c| c.chars().all(|ch| "-:".contains(ch))) {
                continue; // the separator row
            }
            if !in_table {
                s.push_str("<table class=\"grid\">\n");
                in_table = true;
                header = true;
            }
            let tag = if header { "th" } else { "td" };
            s.push_str("<tr>");
            for c in cells {
                let _ = write!(s, "<{tag}>{}</{tag}>", esc(c));
            }
            s.push_str("</tr>\n");
            header = false;
        } else {
            if in_table {
                s.push_str("</table>\n");
                in_table = false;
            }
            if !line.is_empty() {
                let _ = writeln!(s, "<p>{}</p>", esc(line));
            }
        }
    }
    if in_table {
        s.push_str("</table>\n");
    }
    s
}

const STYLE: &str = "
body { font-family: 'DejaVu Sans', Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1080px;
       padding: 0 24px 48px; color: #222; background: #fff; }
header { border-bottom: 2px solid #1f77b4; margin-bottom: 8px; }
h1 { font-size: 28px; margin: 24px 0 4px; }
h2 { font-size: 21px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav a { margin-right: 14px; color: #1f77b4; text-decoration: none; }
.path { color: #666; font-family: monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 16px; min-width: 140px; }
.card .v { font-size: 24px; font-weight: bold; }
.card .k { color: #666; font-size: 13px; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
#samples figure img { image-rendering: pixelated; }
figcaption { color: #555; font-size: 14px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
table.kv th { text-align: left; background: #f6f6f6; font-weight: normal; }
table.kv td { text-align: left; font-family: monospace; }
table.grid th { background: #f0f4f8; }
.note { color: #8a5a00; background: #fff8e6; border: 1px solid #f0d8a0; padding: 8px 12px; }
.columns { display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }
";

/// The "Coordinator" rows of the parameter table.
fn coordinator_rows(run: &RunRecord) -> Vec<(String, String)> {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let fingerprint = match (run.key_fingerprint.as_deref(), &run.cipher) {
        (Some(""), _) | (None, Some(ImageCipher::Plain)) => "none (plain images)".into(),
        (Some(fp), _) => fp.to_string(),
        (None, Some(ImageCipher::Encrypted(spec))) => {
            format!("{} (the first participant's)", spec.key_id)
        }
        (None, None) => "the first participant's".into(),
    };
    vec![
        ("greyfed version".into(), run.greyfed_version.clone()),
        (
            "model".into(),
            run.model.as_ref().map_or_else(
                || "built for the participants' input (nobody admitted)".into(),
                |m| m.name().to_string(),
            ),
        ),
        ("participants".into(), run.participants.to_string()),
        ("min participants".into(), run.min_participants.to_string()),
        ("seed".into(), run.seed.to_string()),
        ("image key fingerprint".into(), fingerprint),
        ("central evaluation".into(), yes_no(run.central_evaluation)),
        ("resumed".into(), yes_no(run.resumed)),
    ]
}

/// The "Training" rows of the parameter table, labelled with the
/// command-line flags that set them (only those that apply: `--momentum`
/// for SGD, `--warmup` for warmup-cosine, ...).
fn training_rows(run: &RunRecord) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |flag: &str, value: String| rows.push((format!("--{flag}"), value));
    let t = &run.training;
    row("rounds", run.rounds.to_string());
    row("local-epochs", t.local_epochs.to_string());
    row("batch-size", t.batch_size.to_string());
    match t.optimizer {
        OptimizerSpec::Sgd { lr, momentum } => {
            row("optimizer", "sgd".into());
            row("lr", lr.to_string());
            row("momentum", momentum.to_string());
        }
        OptimizerSpec::Adam { lr } => {
            row("optimizer", "adam".into());
            row("lr", lr.to_string());
        }
        OptimizerSpec::AdamW { lr, weight_decay } => {
            row("optimizer", "adamw".into());
            row("lr", lr.to_string());
            row("weight-decay", weight_decay.to_string());
        }
        other => row("optimizer", format!("{other:?}")),
    }
    row("lr-schedule", t.lr_schedule.name().into());
    if let LrSchedule::WarmupCosine { warmup_permille } = t.lr_schedule {
        row("warmup", (f32::from(warmup_permille) / 1000.0).to_string());
    }
    match &run.cipher {
        Some(ImageCipher::Encrypted(spec)) => {
            row("block-size", spec.block_size.to_string());
            row("cipher", spec.steps.to_string());
            if t.freeze_key_layers {
                row("freeze-key-layers", "on".into());
            }
            if t.sealed_layers.is_some() {
                row("seal-key-layers", "on".into());
            }
        }
        Some(ImageCipher::Plain) => row("cipher", "plain".into()),
        None => {}
    }
    let fedprox = t.proximal_mu > 0.0;
    match run.strategy {
        StrategyConfig::FedAvg { server_lr } => {
            row(
                "strategy",
                if fedprox { "fedprox" } else { "fedavg" }.into(),
            );
            row("server-lr", server_lr.to_string());
        }
        StrategyConfig::FedAvgM {
            server_lr,
            momentum,
        } => {
            row("strategy", "fedavgm".into());
            row("server-lr", server_lr.to_string());
            row("server-momentum", momentum.to_string());
        }
        StrategyConfig::FedAdam { server_lr, .. } => {
            row("strategy", "fedadam".into());
            row("server-lr", server_lr.to_string());
        }
        other => row("strategy", format!("{other:?}")),
    }
    if fedprox {
        row("proximal-mu", t.proximal_mu.to_string());
    }
    row("aggregation", run.aggregation.name().into());
    row("secagg-clip", run.secagg.clip.to_string());
    if let Some(norm) = run.secagg.max_norm {
        row("max-update-norm", norm.to_string());
    }
    row("secagg-bits", run.secagg.bits.to_string());
    row("dropout-bound", run.secagg.dropout_fraction.to_string());
    row("stage-timeout", run.timeouts.stage_secs.to_string());
    row("round-timeout", run.timeouts.round_secs.to_string());
    row("cohort-fraction", run.selection.fraction.to_string());
    row("min-cohort", run.selection.minimum.to_string());
    rows
}

#[allow(clippy::too_many_arguments)]
pub(super) fn render_html(
    run_dir: &Path,
    rounds: &[RoundRecord],
    run: &RunJson,
    summary: Option<&serde_json::Value>,
    figures: &[Figure],
    samples: Option<&Samples>,
    samples_note: Option<&str>,
) -> String {
    let mut s = String::new();
    let title = format!("greyfed run report: {}", run_dir.display());
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&title)
    );
    let _ = write!(
        s,
        "<header>\n<h1>greyfed run report</h1>\n<p class=\"path\">{}</p>\n<nav>\
         <a href=\"#summary\">Summary</a><a href=\"#parameters\">Parameters</a>\
         <a href=\"#accuracy\">Accuracy</a><a href=\"#loss\">Loss</a><a href=\"#bytes\">Bytes</a>\
         <a href=\"#stages\">Stages</a><a href=\"#survivors\">Participants</a>\
         <a href=\"#samples\">Samples</a><a href=\"#rounds\">Rounds</a></nav>\n</header>\n",
        esc(&run_dir.display().to_string())
    );

    // Summary cards.
    let last = rounds.last();
    let planned = run
        .record()
        .map(|r| r.rounds)
        .filter(|&r| r > 0)
        .or_else(|| {
            summary
                .and_then(|v| v.get("rounds_planned")?.as_u64())
                .map(|v| v as u32)
        });
    let best = rounds
        .iter()
        .filter_map(|r| r.accuracy)
        .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));
    let up: u64 = rounds.iter().map(|r| r.bytes_up).sum();
    let down: u64 = rounds.iter().map(|r| r.bytes_down).sum();
    let secs: f64 = rounds.iter().map(|r| r.secs).sum();
    let cards = [
        (
            "rounds completed",
            match planned {
                Some(p) => format!("{} of {p}", rounds.len()),
                None => rounds.len().to_string(),
            },
        ),
        ("final accuracy", pct(last.and_then(|r| r.accuracy))),
        ("best accuracy", pct(best)),
        ("final test loss", num(last.and_then(|r| r.loss), 4)),
        (
            "bytes up / down",
            format!("{:.1} / {:.1} MB", up as f64 / 1e6, down as f64 / 1e6),
        ),
        ("time in rounds", format!("{secs:.1} s")),
        (
            "aggregation",
            last.map_or_else(|| "–".into(), |r| r.aggregation.clone()),
        ),
    ];
    s.push_str("<section id=\"summary\">\n<h2>Summary</h2>\n<div class=\"cards\">\n");
    for (k, v) in cards {
        let _ = writeln!(
            s,
            "<div class=\"card\"><div class=\"v\">{}</div><div class=\"k\">{}</div></div>",
            esc(&v),
            esc(k)
        );
    }
    s.push_str("</div>\n</section>\n");

    // Parameters.
    s.push_str("<section id=\"parameters\">\n<h2>Run parameters</h2>\n<div class=\"columns\">\n");
    match run {
        RunJson::Record(run) => {
            s.push_str("<div>\n<h3>Coordinator</h3>\n");
            s.push_str(&kv_table(&coordinator_rows(run)));
            s.push_str("</div>\n<div>\n<h3>Training</h3>\n");
            s.push_str(&kv_table(&training_rows(run)));
            s.push_str("</div>\n");
        }
        RunJson::Absent(why) => {
            let _ = writeln!(
                s,
                "<p class=\"note\">{}: the run&#39;s parameters are not shown.</p>",
                esc(why)
            );
        }
    }
    if let Some(serde_json::Value::Object(map)) = summary {
        let mut rows: Vec<(String, String)> = map
            .iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array())
            .map(|(k, v)| (k.replace('_', " "), summary_text(k, v)))
            .collect();
        if let Some(total) = map
            .get("peak_rss")
            .and_then(|m| m.get("total_bytes"))
            .and_then(|v| v.as_u64())
        {
            rows.push((
                "peak memory, all processes".into(),
                format!("{:.1} MB", total as f64 / 1e6),
            ));
        }
        s.push_str("<div>\n<h3>Simulation</h3>\n");
        s.push_str(&kv_table(&rows));
        s.push_str("</div>\n");
    }
    s.push_str("</div>\n</section>\n");

    for f in figures {
        figure_html(&mut s, f, "");
    }

    match samples {
        Some(samples) => {
            let legend = samples
                .legend
                .as_deref()
                .map(markdown_table_html)
                .unwrap_or_default();
            figure_html(&mut s, &samples.figure, &legend);
        }
        None => {
            let _ = writeln!(
                s,
                "<section id=\"samples\">\n<h2>Sample encrypted images</h2>\n\
                 <p class=\"note\">No sample images: {}</p>\n</section>",
                esc(samples_note.unwrap_or("unavailable"))
            );
        }
    }

    s.push_str(
        "<p class=\"note\">What ciphertext-only attacks with many images, known \
         plain/cipher pairs and the fold recover, per mode: <code>greyfed experiment attacks \
         --data DIR --out OUT</code> (OUT/attacks.md; measured on MNIST in docs/attacks.md, \
         summarised in docs/threat-model.md).</p>\n",
    );

    // Per-round table.
    let central = rounds.iter().any(|r| r.central_accuracy.is_some());
    s.push_str(
        "<section id=\"rounds\">\n<h2>Rounds</h2>\n<table class=\"grid\">\n<tr><th>round</th>\
         <th>accuracy</th><th>loss</th><th>train loss</th>",
    );
    if central {
        s.push_str("<th>central accuracy</th>");
    }
    s.push_str(
        "<th>cohort</th><th>survivors</th><th>dropped</th><th>evaluators</th><th>up (MB)</th>\
         <th>down (MB)</th><th>seconds</th><th>aggregation</th></tr>\n",
    );
    for r in rounds {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            r.round,
            pct(r.accuracy),
            num(r.loss, 4),
            num(r.train_loss, 4)
        );
        if central {
            let _ = write!(s, "<td>{}</td>", pct(r.central_accuracy));
        }
        let _ = writeln!(
            s,
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td>\
             <td>{:.2}</td><td>{}</td></tr>",
            r.cohort,
            r.participants,
            r.dropped,
            r.evaluators,
            r.bytes_up as f64 / 1e6,
            r.bytes_down as f64 / 1e6,
            r.secs,
            esc(&r.aggregation)
        );
    }
    s.push_str("</table>\n</section>\n");
    if let Some((round, confusion)) = rounds
        .iter()
        .rev()
        .find_map(|r| Some((r.round, r.confusion.as_ref()?)))
    {
        confusion_html(&mut s, round, confusion, &class_names(run_dir));
    }
    let _ = write!(
        s,
        "<footer><p class=\"path\">written by greyfed {} from {}</p></footer>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&run_dir.join(METRICS_FILE).display().to_string())
    );
    s
}

/// The class names from the run's model file, if it has one.
fn class_names(run_dir: &Path) -> Option<Vec<String>> {
    let bytes = std::fs::read(run_dir.join("model.safetensors")).ok()?;
    Some(ModelFile::from_safetensors(&bytes).ok()?.classes)
}

/// The confusion matrix of `round`'s federated evaluation (the evaluators'
/// secure sum of their counts), rows the true classes, with per-class
/// accuracy; classes are named by `names` when they match, by index
/// otherwise.
fn confusion_html(s: &mut String, round: u32, confusion: &[Vec<u64>], names: &Option<Vec<String>>) {
    let k = confusion.len();
    let name = |i: usize| match names {
        Some(n) if n.len() == k => esc(&n[i]),
        _ => i.to_string(),
    };
    let _ = write!(
        s,
        "<section id=\"confusion\">\n<h2>Confusion matrix after round {round}</h2>\n\
         <p>Rows: true class; columns: predicted class. Summed over the evaluators' test \
         splits by the secure evaluation sum (no participant's own counts).</p>\n\
         <table class=\"grid\">\n<tr><th>true \\ predicted</th>"
    );
    for j in 0..k {
        let _ = write!(s, "<th>{}</th>", name(j));
    }
    s.push_str("<th>accuracy</th></tr>\n");
    for (i, row) in confusion.iter().enumerate() {
        let _ = write!(s, "<tr><th>{}</th>", name(i));
        for v in row {
            let _ = write!(s, "<td>{v}</td>");
        }
        let total: u64 = row.iter().sum();
        let right = row.get(i).copied().unwrap_or(0);
        let acc = (total > 0).then(|| right as f64 / total as f64);
        let _ = writeln!(s, "<td>{}</td></tr>", pct(acc));
    }
    s.push_str("</table>\n</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview;

    #[test]
    fn the_parameter_rows_show_the_settings_that_apply() {
        let text = include_str!("../../tests/data/recorded-run/run.json");
        let mut run: RunRecord = serde_json::from_str(text).unwrap();
        let rows = training_rows(&run);
        let value = |rows: &[(String, String)], k: &str| {
            rows.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        for (flag, v) in [
            ("--rounds", "4"),
            ("--optimizer", "sgd"),
            ("--lr", "0.1"),
            ("--momentum", "0.9"),
            ("--cipher", "block"),
            ("--block-size", "4"),
            ("--strategy", "fedavg"),
            ("--aggregation", "secagg+"),
            ("--stage-timeout", "60"),
            ("--min-cohort", "2"),
        ] {
            assert_eq!(value(&rows, flag).as_deref(), Some(v), "{flag}");
        }
        assert_eq!(value(&rows, "--weight-decay"), None, "only for adamw");
        assert_eq!(value(&rows, "--freeze-key-layers"), None, "only when on");
        run.training.freeze_key_layers = true;
        let frozen = training_rows(&run);
        assert_eq!(value(&frozen, "--freeze-key-layers").as_deref(), Some("on"));
        assert_eq!(value(&frozen, "--seal-key-layers"), None, "only when on");
        run.training.freeze_key_layers = false;
        run.training.sealed_layers = Some(greyfed_protocol::secagg::seal::SealedLayers {
            start: 0,
            len: 3538,
            clip: 4.0,
        });
        let sealed = training_rows(&run);
        assert_eq!(value(&sealed, "--seal-key-layers").as_deref(), Some("on"));
        assert_eq!(value(&sealed, "--freeze-key-layers"), None);
        run.training.proximal_mu = 0.01;
        run.cipher = Some(ImageCipher::Plain);
        run.key_fingerprint = None;
        let rows = training_rows(&run);
        assert_eq!(value(&rows, "--strategy").as_deref(), Some("fedprox"));
        assert_eq!(value(&rows, "--proximal-mu").as_deref(), Some("0.01"));
        assert_eq!(value(&rows, "--cipher").as_deref(), Some("plain"));
        assert_eq!(value(&rows, "--block-size"), None);
        let rows = coordinator_rows(&run);
        assert_eq!(
            value(&rows, "image key fingerprint").as_deref(),
            Some("none (plain images)")
        );
    }

    #[test]
    fn the_confusion_matrix_names_classes_and_gives_per_class_accuracy() {
        let mut s = String::new();
        let names = Some(vec!["cat".to_string(), "d<g".to_string()]);
        confusion_html(&mut s, 7, &[vec![3, 1], vec![0, 4]], &names);
        assert!(s.contains("after round 7"), "{s}");
        assert!(s.contains("<th>cat</th><th>d&lt;g</th>"), "{s}");
        assert!(
            s.contains("<tr><th>cat</th><td>3</td><td>1</td><td>75.00%</td></tr>"),
            "{s}"
        );
        let mut unnamed = String::new();
        confusion_html(&mut unnamed, 1, &[vec![1, 0], vec![0, 1]], &None);
        assert!(unnamed.contains("<th>0</th><th>1</th>"), "{unnamed}");
    }

    #[test]
    fn html_escapes_and_markdown_tables_convert() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let html = markdown_table_html("| a | b |\n|---|--:|\n| 1 | <2> |\n\nColumns: x\n");
        assert_eq!(
            html,
            "<table class=\"grid\">\n<tr><th>a</th><th>b</th></tr>\n\
             <tr><td>1</td><td>&lt;2&gt;</td></tr>\n</table>\n<p>Columns: x</p>\n"
        );
    }

    #[test]
    fn png_size_reads_the_header() {
        let png = preview::encode_png(3, 2, png::ColorType::Grayscale, &[0; 6]).unwrap();
        assert_eq!(png_size(&png), Some((3, 2)));
        assert_eq!(png_size(b"not a png"), None);
    }
}
