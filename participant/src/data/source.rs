//! One entry point for every data format: [`load_data`] picks the reader
//! from what the path points at ([`DataFormat::detect`]).

use std::fmt;
use std::path::Path;

use super::decode::{GreyImage, check_image_size, check_test_fraction, resize_grey};
use super::{Dataset, DatasetSplits, folder, idx, manifest, npz};
use crate::error::{ParticipantError, Result};

/// Options shared by the readers of [`load_data`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// Resize every image to (rows, cols) with a bilinear filter (see
    /// [`super::decode::RESIZE_FILTER`]). Without it, the images of image
    /// folders and manifests must all have the same size.
    pub image_size: Option<(usize, usize)>,
    /// Fraction of each class held out for testing, strictly between 0 and
    /// 1, for data without a test split of its own (an image folder without
    /// `test/`, a manifest without `test` rows); ignored otherwise. Such
    /// data without a fraction is an error.
    pub test_fraction: Option<f64>,
    /// Seeds the split by `test_fraction` and the order of the samples of
    /// image folders and manifests (so that a prefix of a split is not one
    /// class). Every participant must use the same seed to see the same data.
    pub seed: u64,
}

/// The supported data formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// A directory of MNIST-style IDX files ([`idx::load_idx_dir`]).
    Idx,
    /// A directory of class folders of image files ([`folder::load_image_folder`]).
    ImageFolder,
    /// A `.csv` file listing image files and labels ([`manifest::load_manifest`]).
    Manifest,
    /// A MedMNIST-style `.npz` file of arrays ([`npz::load_npz`]).
    Npz,
}

impl DataFormat {
    /// The format of the data at `path`: a `.npz` file, a `.csv` file, a
    /// directory holding `train-images-idx3-ubyte[.gz]` (IDX), or any other
    /// directory (an image folder). Extensions are matched ignoring case.
    /// A missing path, or a file of another kind, is an error naming it.
    pub fn detect(path: &Path) -> Result<DataFormat> {
        if path.is_dir() {
            return Ok(if idx::is_idx_dir(path) {
                DataFormat::Idx
            } else {
                DataFormat::ImageFolder
            });
        }
        if !path.exists() {
            return Err(ParticipantError::Dataset(format!(
                "data path {} does not exist",
                path.display()
            )));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("npz") => Ok(DataFormat::Npz),
            Some("csv") => Ok(DataFormat::Manifest),
            _ => Err(ParticipantError::Dataset(format!(
                "cannot tell the format of {}: expected a .npz or .csv file, or a directory \
                 (IDX files or class folders of images)",
                path.display()
            ))),
        }
    }

    /// A short lower-case name (`idx`, `image-folder`, `manifest`, `npz`),
    /// for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Idx => "idx",
            DataFormat::ImageFolder => "image-folder",
            DataFormat::Manifest => "manifest",
            DataFormat::Npz => "npz",
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Loads the data at `path` in whichever format [`DataFormat::detect`]
/// finds, with `options`. IDX data are resized like the others when
/// `options.image_size` is set; IDX and `.npz` data keep their own test
/// split (and ignore the test fraction).
pub fn load_data(path: &Path, options: &LoadOptions) -> Result<DatasetSplits> {
    if let Some(size) = options.image_size {
        check_image_size(size)?;
    }
    if let Some(f) = options.test_fraction {
        check_test_fraction(f)?;
    }
    match DataFormat::detect(path)? {
        DataFormat::Idx => {
            let splits = idx::load_idx_dir(path)?;
            match options.image_size {
                Some((rows, cols)) => DatasetSplits::new(
                    resize_dataset(&splits.train, rows, cols)?,
                    resize_dataset(&splits.test, rows, cols)?,
                    splits.classes,
                ),
                None => Ok(splits),
            }
        }
        DataFormat::ImageFolder => folder::load_image_folder(path, options),
        DataFormat::Manifest => manifest::load_manifest(path, options),
        DataFormat::Npz => npz::load_npz(path, options),
    }
}

/// A grey-scale dataset with every image resized to `rows x cols`.
fn resize_dataset(data: &Dataset, rows: usize, cols: usize) -> Result<Dataset> {
    if (data.rows(), data.cols()) == (rows, cols) {
        return Ok(data.clone());
    }
    let mut pixels = Vec::with_capacity(data.len() * rows * cols);
    for i in 0..data.len() {
        let img = GreyImage {
            rows: data.rows(),
            cols: data.cols(),
            pixels: data.image(i).to_vec(),
        };
        pixels.extend(resize_grey(&img, rows, cols).pixels);
    }
    Dataset::new(
        rows,
        cols,
        data.num_classes(),
        pixels,
        data.labels().to_vec(),
    )
}

/// Parses an image size written `HxW` (rows x cols, e.g. `28x28`; `X` and
/// `*` also separate), as the `--image-size` flag takes it.
pub fn parse_image_size(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        ParticipantError::Dataset(format!(
            "image size {s:?} is not HxW (rows x columns, e.g. 28x28)"
        ))
    };
    let (h, w) = s.trim().split_once(['x', 'X', '*']).ok_or_else(bad)?;
    let size = (
        h.trim().parse().map_err(|_| bad())?,
        w.trim().parse().map_err(|_| bad())?,
    );
    check_image_size(size)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::data::decode::tests::{message, write_grey_png};

    #[test]
    fn formats_are_detected_from_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(DataFormat::detect(d).unwrap(), DataFormat::ImageFolder);
        fs::write(d.join("train-images-idx3-ubyte.gz"), "x").unwrap();
        assert_eq!(DataFormat::detect(d).unwrap(), DataFormat::Idx);
        fs::write(d.join("a.NPZ"), "x").unwrap();
        assert_eq!(
            DataFormat::detect(&d.join("a.NPZ")).unwrap(),
            DataFormat::Npz
        );
        fs::write(d.join("a.csv"), "x").unwrap();
        assert_eq!(
            DataFormat::detect(&d.join("a.csv")).unwrap(),
            DataFormat::Manifest
        );
        fs::write(d.join("a.txt"), "x").unwrap();
        let m = message(DataFormat::detect(&d.join("a.txt")));
        assert!(m.contains("a.txt") && m.contains(".npz or .csv"), "{m}");
        let m = message(load_data(&d.join("absent"), &LoadOptions::default()));
        assert!(m.contains("absent") && m.contains("does not exist"), "{m}");
        let names: Vec<&str> = [
            DataFormat::Idx,
            DataFormat::ImageFolder,
            DataFormat::Manifest,
            DataFormat::Npz,
        ]
        .iter()
        .map(|f| f.name())
        .collect();
        assert_eq!(names, ["idx", "image-folder", "manifest", "npz"]);
        assert_eq!(DataFormat::Npz.to_string(), "npz");
    }

    #[test]
    fn load_data_reads_folders_and_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (class, value) in [("b", 200u8), ("a", 100)] {
            fs::create_dir_all(d.join("imgs").join(class)).unwrap();
            for i in 0..5 {
                write_grey_png(&d.join(format!("imgs/{class}/{i}.png")), 4, 4, value);
            }
        }
        let options = LoadOptions {
            image_size: Some((2, 2)),
            test_fraction: Some(0.2),
            seed: 0,
        };
        let s = load_data(&d.join("imgs"), &options).unwrap();
        assert_eq!(s.classes, ["a", "b"]);
        assert_eq!((s.train.len(), s.test.len()), (8, 2));
        assert_eq!((s.train.rows(), s.train.cols()), (2, 2));
        for i in 0..s.train.len() {
            let want = if s.train.label(i) == 0 { 100 } else { 200 };
            assert_eq!(s.train.image(i), [want; 4]);
        }
        fs::write(
            d.join("m.csv"),
            "path,label,split\nimgs/a/0.png,a,train\nimgs/b/0.png,b,test\n",
        )
        .unwrap();
        let s = load_data(&d.join("m.csv"), &LoadOptions::default()).unwrap();
        assert_eq!(s.classes, ["a", "b"]);
        assert_eq!(
            (s.train.labels(), s.test.labels()),
            (&[0u8][..], &[1u8][..])
        );
        let bad = LoadOptions {
            test_fraction: Some(0.0),
            ..LoadOptions::default()
        };
        assert!(message(load_data(&d.join("m.csv"), &bad)).contains("--test-fraction"));
    }

    #[test]
    fn idx_data_can_be_resized() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let images = |n: u32, value: u8| {
            let mut v = vec![0, 0, 8, 3];
            for x in [n, 4, 4] {
                v.extend(x.to_be_bytes());
            }
            v.extend(vec![value; 16 * n as usize]);
            v
        };
        let labels = |l: &[u8]| {
            let mut v = vec![0, 0, 8, 1];
            v.extend((l.len() as u32).to_be_bytes());
            v.extend(l);
            v
        };
        fs::write(d.join("train-images-idx3-ubyte"), images(3, 50)).unwrap();
        fs::write(d.join("train-labels-idx1-ubyte"), labels(&[0, 1, 2])).unwrap();
        fs::write(d.join("t10k-images-idx3-ubyte"), images(1, 60)).unwrap();
        fs::write(d.join("t10k-labels-idx1-ubyte"), labels(&[1])).unwrap();
        let plain = load_data(d, &LoadOptions::default()).unwrap();
        assert_eq!(plain.train.pixels(), [50; 48]);
        assert_eq!(plain.classes.len(), 10);
        let sized = LoadOptions {
            image_size: Some((2, 3)),
            ..LoadOptions::default()
        };
        let s = load_data(d, &sized).unwrap();
        assert_eq!((s.train.rows(), s.train.cols()), (2, 3));
        assert_eq!(s.train.pixels(), [50; 18]);
        assert_eq!(s.test.pixels(), [60; 6]);
        assert_eq!(s.train.labels(), [0, 1, 2]);
        assert_eq!(s.classes, plain.classes);
    }

    #[test]
    fn image_sizes_parse() {
        assert_eq!(parse_image_size("28x28").unwrap(), (28, 28));
        assert_eq!(parse_image_size(" 32 X 64 ").unwrap(), (32, 64));
        assert_eq!(parse_image_size("8*4").unwrap(), (8, 4));
        for bad in ["28", "x28", "28x", "0x5", "axb", "-1x4", "20000x1"] {
            assert!(parse_image_size(bad).is_err(), "{bad}");
        }
    }
}
