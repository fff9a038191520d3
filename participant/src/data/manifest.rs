//! CSV manifests: a `.csv` file listing image files and their labels.
//!
//! The first row is a header naming the columns; `path` and `label` are
//! required, `split` is optional, column names are matched ignoring case
//! and surrounding spaces, and other columns are ignored. Fields may be
//! quoted (standard CSV, read with the `csv` crate).
//!
//! - `path`: the image file, relative to the CSV file's folder (or absolute).
//! - `label`: if every label is an integer, label `k` is class `k` and the
//!   classes are `"0"` to the largest label (which must be below 256);
//!   otherwise labels are class names, and the classes are the distinct
//!   names sorted by their bytes.
//! - `split`: `train` or `test` (any case). Without the column, or without
//!   any `test` row, the images are split by [`LoadOptions::test_fraction`]
//!   as for image folders.
//!
//! Images are decoded as for image folders (see [`super::decode`]). Errors
//! name the CSV file and the line.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::decode::{Files, LabelledFile, assemble};
use super::{DatasetSplits, LoadOptions};
use crate::error::{ParticipantError, Result};

/// One data row of a manifest.
struct Row {
    line: u64,
    path: PathBuf,
    /// Empty when the manifest has no label column (see [`read_rows`]).
    label: String,
    test: bool,
}

/// Loads the images listed in the CSV manifest `csv_path` (see the module
/// documentation). Samples are put in a seeded random order within each
/// split.
pub fn load_manifest(csv_path: &Path, options: &LoadOptions) -> Result<DatasetSplits> {
    let name = csv_path.display();
    let at =
        |line: u64, what: String| ParticipantError::Dataset(format!("{name} line {line}: {what}"));
    let rows = read_rows(csv_path, true)?;
    let (labels, classes) = resolve_labels(&rows).map_err(|(line, what)| at(line, what))?;
    let files = rows.iter().zip(labels).map(|(r, label)| LabelledFile {
        path: r.path.clone(),
        label,
        origin: Some(format!("{name} line {}", r.line)),
    });
    let any_test = rows.iter().any(|r| r.test);
    let files = if any_test {
        let (test, train): (Vec<_>, Vec<_>) = rows.iter().zip(files).partition(|(r, _)| r.test);
        Files::Split {
            train: train.into_iter().map(|(_, f)| f).collect(),
            test: test.into_iter().map(|(_, f)| f).collect(),
        }
    } else {
        Files::Unsplit(files.collect())
    };
    assemble(files, classes, csv_path, options)
}

/// The image files the CSV manifest `csv_path` lists, in row order (for
/// classifying them: a `label` column is not needed). Errors as for
/// [`load_manifest`], naming the file and line.
pub fn manifest_image_paths(csv_path: &Path) -> Result<Vec<PathBuf>> {
    Ok(read_rows(csv_path, false)?
        .into_iter()
        .map(|r| r.path)
        .collect())
}

/// The rows of the manifest, each image file checked to exist; the label
/// column is required when `labelled`.
fn read_rows(csv_path: &Path, labelled: bool) -> Result<Vec<Row>> {
    let name = csv_path.display();
    let at =
        |line: u64, what: String| ParticipantError::Dataset(format!("{name} line {line}: {what}"));
    let file = File::open(csv_path).map_err(|e| ParticipantError::Io {
        path: csv_path.to_path_buf(),
        source: e,
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(file);
    let csv_err = |e: csv::Error| {
        let line = e
            .position()
            .map_or(String::new(), |p| format!(" line {}", p.line()));
        ParticipantError::Dataset(format!("{name}{line}: {e}"))
    };
    let headers = reader.headers().map_err(csv_err)?.clone();
    let column = |wanted: &str| {
        headers.iter().position(|h| {
            h.trim()
                .trim_start_matches('\u{feff}')
                .eq_ignore_ascii_case(wanted)
        })
    };
    let (path_col, label_col) = (column("path"), column("label"));
    let (Some(path_col), true) = (path_col, label_col.is_some() || !labelled) else {
        return Err(ParticipantError::Dataset(format!(
            "{name} line 1: the header must name the columns path{} (found: {})",
            if labelled { " and label" } else { "" },
            headers.iter().collect::<Vec<_>>().join(", ")
        )));
    };
    let split_col = column("split");
    let base = csv_path.parent().unwrap_or(Path::new(""));
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |col: usize, what: &str| match record.get(col).map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(at(line, format!("no {what}"))),
        };
        let rel = Path::new(field(path_col, "path")?);
        let path = if rel.is_absolute() {
            rel.to_path_buf()
        } else {
            base.join(rel)
        };
        if !path.is_file() {
            return Err(at(
                line,
                format!("image file {} does not exist", path.display()),
            ));
        }
        let label = match label_col {
            Some(col) => field(col, "label")?.to_owned(),
            None => String::new(),
        };
        let test = match split_col {
            None => false,
            Some(col) => {
                let split = field(col, "split")?;
                if split.eq_ignore_ascii_case("test") {
                    true
                } else if split.eq_ignore_ascii_case("train") {
                    false
                } else {
                    return Err(at(
                        line,
                        format!("split {split:?} is neither train nor test"),
                    ));
                }
            }
        };
        rows.push(Row {
            line,
            path,
            label,
            test,
        });
    }
    if rows.is_empty() {
        return Err(ParticipantError::Dataset(format!("{name} lists no images")));
    }
    Ok(rows)
}

/// The label of every row and the class names, or the line and the
/// problem of the first bad label.
fn resolve_labels(rows: &[Row]) -> std::result::Result<(Vec<u8>, Vec<String>), (u64, String)> {
    let numbers: Option<Vec<i64>> = rows.iter().map(|r| r.label.parse().ok()).collect();
    if let Some(numbers) = numbers {
        let mut labels = Vec::with_capacity(rows.len());
        for (r, &n) in rows.iter().zip(&numbers) {
            match u8::try_from(n) {
                Ok(l) => labels.push(l),
                Err(_) => {
                    return Err((
                        r.line,
                        format!("label {n} is out of range: numeric labels must be in 0..=255"),
                    ));
                }
            }
        }
        let max = labels.iter().copied().max().unwrap_or(0);
        let classes = (0..=max).map(|c| c.to_string()).collect();
        return Ok((labels, classes));
    }
    let names: BTreeSet<&[u8]> = rows.iter().map(|r| r.label.as_bytes()).collect();
    if names.len() > 256 {
        let line = rows.last().map_or(0, |r| r.line);
        return Err((
            line,
            format!(
                "{} distinct class names; at most 256 classes are supported",
                names.len()
            ),
        ));
    }
    let names: Vec<&[u8]> = names.into_iter().collect();
    let labels = rows
        .iter()
        .map(|r| names.binary_search(&r.label.as_bytes()).unwrap_or(0) as u8)
        .collect();
    let classes = names
        .into_iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    Ok((labels, classes))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use image::{ImageBuffer, Rgb};

    use super::*;
    use crate::data::decode::tests::{message, write_grey_png};

    fn opts(fraction: Option<f64>) -> LoadOptions {
        LoadOptions {
            image_size: None,
            test_fraction: fraction,
            seed: 1,
        }
    }

    /// Sorted (label, first pixel) pairs of a split.
    fn samples(d: &crate::data::Dataset) -> Vec<(u8, u8)> {
        let mut v: Vec<(u8, u8)> = (0..d.len()).map(|i| (d.label(i), d.image(i)[0])).collect();
        v.sort();
        v
    }

    /// A folder with grey PNGs `img/0.png` .. `img/{n-1}.png` of value `10 * i`.
    fn images(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("img")).unwrap();
        for i in 0..n {
            write_grey_png(&dir.path().join(format!("img/{i}.png")), 3, 2, 10 * i as u8);
        }
        dir
    }

    #[test]
    fn image_paths_need_no_label_column_but_loading_does() {
        let dir = images(3);
        let csv = dir.path().join("unlabelled.csv");
        fs::write(&csv, "Path,notes\nimg/2.png,x\n\"img/0.png\",y\n").unwrap();
        let paths = manifest_image_paths(&csv).unwrap();
        assert_eq!(
            paths,
            [dir.path().join("img/2.png"), dir.path().join("img/0.png")]
        );
        let err = load_manifest(&csv, &opts(Some(0.5)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("path and label"), "{err}");
        fs::write(&csv, "path\nimg/9.png\n").unwrap();
        let err = manifest_image_paths(&csv).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("9.png"), "{err}");
    }

    #[test]
    fn named_labels_with_split_column() {
        let dir = images(4);
        let csv = dir.path().join("data.csv");
        // Quoted fields, extra column, header in another case, a comma in a field.
        fs::write(
            &csv,
            "id,Label,PATH,Split\n\
             1,\"dog, big\",img/0.png,train\n\
             2,cat,\"img/1.png\",TRAIN\n\
             3,cat,img/2.png,test\n\
             4,\"dog, big\",img/3.png,test\n",
        )
        .unwrap();
        let s = load_manifest(&csv, &opts(None)).unwrap();
        assert_eq!(s.classes, ["cat", "dog, big"]);
        assert_eq!(samples(&s.train), [(0, 10), (1, 0)]);
        assert_eq!(samples(&s.test), [(0, 20), (1, 30)]);
        assert_eq!((s.train.rows(), s.train.cols()), (3, 2));
    }

    #[test]
    fn numeric_labels_and_absolute_paths_split_by_fraction() {
        let dir = images(6);
        let abs = dir.path().join("img/5.png");
        let csv = dir.path().join("list.csv");
        fs::write(
            &csv,
            format!(
                "path,label\nimg/0.png,0\nimg/1.png,3\nimg/2.png,0\nimg/3.png,3\nimg/4.png,0\n{},3\n",
                abs.display()
            ),
        )
        .unwrap();
        let m = message(load_manifest(&csv, &opts(None)));
        assert!(
            m.contains("--test-fraction") && m.contains("list.csv"),
            "{m}"
        );
        let s = load_manifest(&csv, &opts(Some(0.34))).unwrap();
        assert_eq!(s.classes, ["0", "1", "2", "3"]);
        assert_eq!(s.test.class_counts(), [1, 0, 0, 1]);
        assert_eq!(s.train.class_counts(), [2, 0, 0, 2]);
        let mut all = samples(&s.train);
        all.extend(samples(&s.test));
        all.sort();
        assert_eq!(all, [(0, 0), (0, 20), (0, 40), (3, 10), (3, 30), (3, 50)]);
    }

    #[test]
    fn colour_images_and_resizing() {
        let dir = images(1);
        ImageBuffer::from_pixel(5, 5, Rgb([255u8, 0, 0]))
            .save(dir.path().join("img/red.png"))
            .unwrap();
        let csv = dir.path().join("m.csv");
        fs::write(
            &csv,
            "path,label,split\nimg/0.png,a,train\nimg/red.png,b,test\n",
        )
        .unwrap();
        let m = message(load_manifest(&csv, &opts(None)));
        assert!(
            m.contains("m.csv line 2") && m.contains("m.csv line 3") && m.contains("--image-size"),
            "{m}"
        );
        let sized = LoadOptions {
            image_size: Some((4, 4)),
            ..opts(None)
        };
        let s = load_manifest(&csv, &sized).unwrap();
        assert_eq!(s.test.image(0), [76; 16]);
        assert_eq!(s.train.image(0), [0; 16]);
    }

    #[test]
    fn bad_manifests_name_the_file_and_line() {
        let dir = images(2);
        let csv = dir.path().join("bad.csv");
        let check = |text: &str, wanted: &[&str]| {
            fs::write(&csv, text).unwrap();
            let m = message(load_manifest(&csv, &opts(Some(0.5))));
            assert!(m.contains("bad.csv"), "{m}");
            for w in wanted {
                assert!(m.contains(w), "{m} lacks {w}");
            }
        };
        check("file,label\nimg/0.png,1\n", &["line 1", "path and label"]);
        check("path,class\nimg/0.png,1\n", &["line 1", "path and label"]);
        check(
            "path,label\nimg/0.png,1\nimg/9.png,1\n",
            &["line 3", "img/9.png", "does not exist"],
        );
        check(
            "path,label\nimg/0.png,1\nimg/1.png,256\n",
            &["line 3", "256", "out of range"],
        );
        check(
            "path,label\nimg/0.png,-1\nimg/1.png,2\n",
            &["line 2", "-1", "out of range"],
        );
        check(
            "path,label\nimg/0.png,1\nimg/1.png\n",
            &["line 3", "no label"],
        );
        check("path,label\nimg/0.png,\n", &["line 2", "no label"]);
        check(
            "path,label,split\nimg/0.png,1,train\nimg/1.png,1,valid\n",
            &["line 3", "\"valid\""],
        );
        check("path,label\n", &["lists no images"]);
        // A broken image names the file and the manifest line.
        fs::write(dir.path().join("img/broken.png"), "not a png").unwrap();
        check(
            "path,label\nimg/0.png,1\nimg/broken.png,2\n",
            &["line 3", "broken.png", "cannot decode"],
        );
        // Missing CSV file.
        match load_manifest(&dir.path().join("none.csv"), &opts(None)) {
            Err(ParticipantError::Io { path, .. }) => assert!(path.ends_with("none.csv")),
            other => panic!("expected an Io error, got {other:?}"),
        }
    }
}
