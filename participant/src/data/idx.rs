//! Reader for the IDX format used by MNIST and Fashion-MNIST.
//!
//! An IDX file is a big-endian header — two zero bytes, a data-type byte, the
//! number of dimensions, then one `u32` per dimension — followed by the data.
//! Only unsigned bytes (type `0x08`) are supported: images are
//! `count x rows x cols` (magic `0x00000803`), labels are `count`
//! (magic `0x00000801`). Files may be gzip-compressed; [`read_idx_file`]
//! decompresses them transparently, with a cap on the decompressed size.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::{Dataset, DatasetSplits, numbered_classes};
use crate::error::{ParticipantError, Result};

/// Largest file, compressed or decompressed, that [`read_idx_file`] accepts (2 GiB).
pub const MAX_IDX_FILE_BYTES: u64 = 2 << 30;

/// Largest number of items (images or labels) an IDX header may declare.
pub const MAX_IDX_ITEMS: usize = 100_000_000;

/// Largest image side (rows or columns) an IDX header may declare.
pub const MAX_IDX_SIDE: usize = 16_384;

/// The only supported IDX data type: unsigned byte.
const DTYPE_U8: u8 = 0x08;

/// The two bytes every gzip stream starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// File names of an MNIST-style directory, in load order.
const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

fn idx_err(source: &Path, reason: impl Into<String>) -> ParticipantError {
    ParticipantError::Idx {
        path: source.to_path_buf(),
        reason: reason.into(),
    }
}

fn dtype_name(dtype: u8) -> &'static str {
    match dtype {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "i16",
        0x0C => "i32",
        0x0D => "f32",
        0x0E => "f64",
        _ => "unknown",
    }
}

/// Checks the header of an unsigned-byte IDX file with `ndim` dimensions and
/// returns the dimensions and the data that follows the header.
fn parse_header<'a>(
    bytes: &'a [u8],
    source: &Path,
    ndim: u8,
    what: &str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let expected_magic = u32::from_be_bytes([0, 0, DTYPE_U8, ndim]);
    if bytes.len() < 4 {
        return Err(idx_err(
            source,
            format!(
                "file is {} bytes long, too short for an IDX header (expected magic {expected_magic:#010x} for {what})",
                bytes.len()
            ),
        ));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 {
        let hint = if bytes[..2] == GZIP_MAGIC {
            " — this looks gzip-compressed; read it with read_idx_file"
        } else {
            " — not an IDX file"
        };
        return Err(idx_err(
            source,
            format!("expected magic {expected_magic:#010x} ({what}), found {magic:#010x}{hint}"),
        ));
    }
    let dtype = bytes[2];
    if dtype != DTYPE_U8 {
        return Err(idx_err(
            source,
            format!(
                "unsupported data type {dtype:#04x} ({}); only unsigned byte (0x08) is supported",
                dtype_name(dtype)
            ),
        ));
    }
    let found_ndim = bytes[3];
    if found_ndim != ndim {
        let hint = match found_ndim {
            1 => " — is this a labels file?",
            3 => " — is this an images file?",
            _ => "",
        };
        return Err(idx_err(
            source,
            format!(
                "expected magic {expected_magic:#010x} ({what}), found {magic:#010x}: {found_ndim} dimensions instead of {ndim}{hint}"
            ),
        ));
    }
    let header_len = 4 + 4 * ndim as usize;
    if bytes.len() < header_len {
        return Err(idx_err(
            source,
            format!(
                "truncated header: {ndim} dimensions need {header_len} header bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let dims = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    Ok((dims, &bytes[header_len..]))
}

/// Checks that `data` holds exactly `expected` bytes.
fn check_data_len(data: &[u8], expected: usize, source: &Path, what: &str) -> Result<()> {
    if data.len() < expected {
        return Err(idx_err(
            source,
            format!(
                "truncated: header promises {expected} {what} bytes, file has {}",
                data.len()
            ),
        ));
    }
    if data.len() > expected {
        return Err(idx_err(
            source,
            format!(
                "{} trailing bytes after the {expected} {what} bytes the header promises",
                data.len() - expected
            ),
        ));
    }
    Ok(())
}

fn check_count(count: usize, source: &Path, what: &str) -> Result<()> {
    if count > MAX_IDX_ITEMS {
        return Err(idx_err(
            source,
            format!("header declares {count} {what}, more than the supported {MAX_IDX_ITEMS}"),
        ));
    }
    Ok(())
}

/// Parses an IDX images file (magic `0x00000803`) already in memory.
///
/// Returns `(rows, cols, pixels)` with the pixels of all images, image after
/// image, row-major. `source` names the data in error messages.
pub fn parse_idx_images(bytes: &[u8], source: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let (dims, data) = parse_header(bytes, source, 3, "images")?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    check_count(count, source, "images")?;
    if rows == 0 || cols == 0 {
        return Err(idx_err(
            source,
            format!("image size {rows}x{cols} is empty"),
        ));
    }
    if rows > MAX_IDX_SIDE || cols > MAX_IDX_SIDE {
        return Err(idx_err(
            source,
            format!("image size {rows}x{cols} exceeds the supported {MAX_IDX_SIDE} per side"),
        ));
    }
    let expected = count
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .ok_or_else(|| {
            idx_err(
                source,
                format!("{count} images of {rows}x{cols} overflow the address space"),
            )
        })?;
    check_data_len(data, expected, source, "pixel")?;
    Ok((rows, cols, data.to_vec()))
}

/// Parses an IDX labels file (magic `0x00000801`) already in memory.
///
/// `source` names the data in error messages.
pub fn parse_idx_labels(bytes: &[u8], source: &Path) -> Result<Vec<u8>> {
    let (dims, data) = parse_header(bytes, source, 1, "labels")?;
    let count = dims[0];
    check_count(count, source, "labels")?;
    check_data_len(data, count, source, "label")?;
    Ok(data.to_vec())
}

/// Reads at most `limit + 1` bytes from `reader`, so the caller can tell
/// whether the limit was exceeded without reading everything.
fn read_capped(reader: impl Read, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.take(limit.saturating_add(1)).read_to_end(&mut out)?;
    Ok(out)
}

/// Decompresses a (possibly multi-member) gzip stream, refusing output
/// larger than `limit` bytes.
/// Decompresses gzip data (one or more members) of at most `limit` bytes
/// once decompressed; more is refused without allocating beyond the limit.
/// `path` names the data in error messages.
pub fn gunzip(compressed: &[u8], path: &Path, limit: u64) -> Result<Vec<u8>> {
    let out = read_capped(MultiGzDecoder::new(compressed), limit)
        .map_err(|e| idx_err(path, format!("corrupt gzip data: {e}")))?;
    if out.len() as u64 > limit {
        return Err(idx_err(
            path,
            format!("decompresses to more than {limit} bytes; refusing to continue"),
        ));
    }
    Ok(out)
}

/// Reads a file, gunzipping it when it starts with the gzip magic `1f 8b`.
///
/// Files (compressed or decompressed) larger than [`MAX_IDX_FILE_BYTES`] are
/// refused. A missing or unreadable file is [`ParticipantError::Io`]; corrupt
/// gzip data is [`ParticipantError::Idx`].
pub fn read_idx_file(path: &Path) -> Result<Vec<u8>> {
    read_idx_file_capped(path, MAX_IDX_FILE_BYTES)
}

fn read_idx_file_capped(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let io_err = |source| ParticipantError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err)?;
    let bytes = read_capped(file, limit).map_err(io_err)?;
    if bytes.len() as u64 > limit {
        return Err(idx_err(
            path,
            format!("file is larger than {limit} bytes; refusing to read it"),
        ));
    }
    if bytes.starts_with(&GZIP_MAGIC) {
        gunzip(&bytes, path, limit)
    } else {
        Ok(bytes)
    }
}

/// Finds `name` or `name.gz` in `dir`, preferring the uncompressed file.
fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok(raw);
    }
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    let mut contents: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            return Err(ParticipantError::Dataset(format!(
                "cannot list dataset directory {}: {e}",
                dir.display()
            )));
        }
    };
    contents.sort();
    const SHOWN: usize = 20;
    let listing = if contents.is_empty() {
        "it is empty".to_owned()
    } else if contents.len() > SHOWN {
        format!(
            "it contains {}, … ({} entries)",
            contents[..SHOWN].join(", "),
            contents.len()
        )
    } else {
        format!("it contains {}", contents.join(", "))
    };
    Err(ParticipantError::Dataset(format!(
        "found neither {name} nor {name}.gz in {} ({listing}); an IDX dataset directory needs \
         {TRAIN_IMAGES}, {TRAIN_LABELS}, {TEST_IMAGES} and {TEST_LABELS}, each raw or gzipped",
        dir.display()
    )))
}

/// True when `dir` holds an IDX training-images file
/// (`train-images-idx3-ubyte`, raw or gzipped): how [`super::DataFormat`]
/// tells an IDX directory from an image folder.
pub fn is_idx_dir(dir: &Path) -> bool {
    dir.join(TRAIN_IMAGES).is_file() || dir.join(format!("{TRAIN_IMAGES}.gz")).is_file()
}

/// Loads one split: images and labels, checking that their counts agree.
fn load_split(
    dir: &Path,
    images: &str,
    labels: &str,
    split: &str,
) -> Result<(usize, usize, Vec<u8>, Vec<u8>)> {
    let images_path = find_file(dir, images)?;
    let labels_path = find_file(dir, labels)?;
    let (rows, cols, pixels) = parse_idx_images(&read_idx_file(&images_path)?, &images_path)?;
    let labels = parse_idx_labels(&read_idx_file(&labels_path)?, &labels_path)?;
    let count = pixels.len() / (rows * cols);
    if labels.len() != count {
        return Err(ParticipantError::Dataset(format!(
            "{split} split: {} has {count} images but {} has {} labels",
            images_path.display(),
            labels_path.display(),
            labels.len()
        )));
    }
    if count == 0 {
        return Err(ParticipantError::Dataset(format!(
            "{split} split: {} holds no images",
            images_path.display()
        )));
    }
    Ok((rows, cols, pixels, labels))
}

/// Loads an MNIST-style directory: `train-images-idx3-ubyte`,
/// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
/// `t10k-labels-idx1-ubyte`, each raw or with a `.gz` suffix (raw preferred).
///
/// Both splits must have the same image size and one label per image. The
/// number of classes is 10 when every label is at most 9 (MNIST,
/// Fashion-MNIST), otherwise the largest label plus one; the classes are
/// named by their numbers (`"0"`, `"1"`, ...).
pub fn load_idx_dir(dir: &Path) -> Result<DatasetSplits> {
    if !dir.is_dir() {
        return Err(ParticipantError::Dataset(format!(
            "dataset directory {} does not exist or is not a directory",
            dir.display()
        )));
    }
    let (rows, cols, train_pixels, train_labels) =
        load_split(dir, TRAIN_IMAGES, TRAIN_LABELS, "train")?;
    let (test_rows, test_cols, test_pixels, test_labels) =
        load_split(dir, TEST_IMAGES, TEST_LABELS, "test")?;
    if (rows, cols) != (test_rows, test_cols) {
        return Err(ParticipantError::Dataset(format!(
            "train images are {rows}x{cols} but test images are {test_rows}x{test_cols} in {}",
            dir.display()
        )));
    }
    let max_label = train_labels
        .iter()
        .chain(&test_labels)
        .copied()
        .max()
        .unwrap_or(0) as usize;
    let num_classes = if max_label < 10 { 10 } else { max_label + 1 };
    DatasetSplits::new(
        Dataset::new(rows, cols, num_classes, train_pixels, train_labels)?,
        Dataset::new(rows, cols, num_classes, test_pixels, test_labels)?,
        numbered_classes(num_classes),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn images_idx(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 0x08, 3];
        for d in [count, rows, cols] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(pixels);
        v
    }

    fn labels_idx(labels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 0x08, 1];
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn reason(err: ParticipantError) -> String {
        match err {
            ParticipantError::Idx { reason, .. } => reason,
            other => panic!("expected an Idx error, got {other:?}"),
        }
    }

    fn src() -> &'static Path {
        Path::new("test.idx")
    }

    /// Writes a small MNIST-style directory; `gz` picks compressed files.
    fn write_dir(dir: &Path, gz: bool, train: (usize, u8), test: (usize, u8)) {
        let (rows, cols) = (4u32, 3u32);
        let write = |name: &str, bytes: Vec<u8>| {
            let (name, bytes) = if gz {
                (format!("{name}.gz"), gzip(&bytes))
            } else {
                (name.to_owned(), bytes)
            };
            fs::write(dir.join(name), bytes).unwrap();
        };
        for (images, labels, (n, classes)) in [
            (TRAIN_IMAGES, TRAIN_LABELS, train),
            (TEST_IMAGES, TEST_LABELS, test),
        ] {
            let pixels: Vec<u8> = (0..n * 12).map(|i| (i * 7 % 256) as u8).collect();
            let labs: Vec<u8> = (0..n).map(|i| (i % classes as usize) as u8).collect();
            write(images, images_idx(n as u32, rows, cols, &pixels));
            write(labels, labels_idx(&labs));
        }
    }

    #[test]
    fn parses_images_and_labels() {
        let pixels: Vec<u8> = (0..2 * 3 * 5).collect();
        let (rows, cols, got) = parse_idx_images(&images_idx(2, 3, 5, &pixels), src()).unwrap();
        assert_eq!((rows, cols), (3, 5));
        assert_eq!(got, pixels);
        assert_eq!(
            parse_idx_labels(&labels_idx(&[3, 1, 4]), src()).unwrap(),
            vec![3, 1, 4]
        );
        assert_eq!(
            parse_idx_labels(&labels_idx(&[]), src()).unwrap(),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn raw_and_gzip_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = images_idx(3, 2, 2, &[9; 12]);
        let raw = dir.path().join("raw");
        let gz = dir.path().join("raw.gz");
        fs::write(&raw, &bytes).unwrap();
        fs::write(&gz, gzip(&bytes)).unwrap();
        assert_eq!(read_idx_file(&raw).unwrap(), bytes);
        assert_eq!(read_idx_file(&gz).unwrap(), bytes);
        // Multi-member gzip (as produced by `cat a.gz b.gz`) is read whole.
        let mut multi = gzip(&bytes[..7]);
        multi.extend(gzip(&bytes[7..]));
        fs::write(&gz, multi).unwrap();
        assert_eq!(read_idx_file(&gz).unwrap(), bytes);
    }

    #[test]
    fn bad_magic_is_explained() {
        let r = reason(parse_idx_images(&labels_idx(&[1, 2]), src()).unwrap_err());
        assert!(r.contains("0x00000803") && r.contains("0x00000801"), "{r}");
        assert!(r.contains("labels file"), "{r}");
        let r = reason(parse_idx_labels(&images_idx(1, 1, 1, &[0]), src()).unwrap_err());
        assert!(r.contains("images file"), "{r}");
        let r = reason(parse_idx_images(b"P5\n28 28\n255\n", src()).unwrap_err());
        assert!(r.contains("not an IDX file"), "{r}");
        let r = reason(parse_idx_images(&gzip(b"x"), src()).unwrap_err());
        assert!(r.contains("gzip"), "{r}");
        let r = reason(parse_idx_labels(&[0, 0], src()).unwrap_err());
        assert!(r.contains("too short"), "{r}");
        let r = reason(parse_idx_images(&[0, 0, 8, 3, 0, 0], src()).unwrap_err());
        assert!(r.contains("truncated header"), "{r}");
    }

    #[test]
    fn wrong_dtype_is_refused() {
        let mut bytes = images_idx(1, 1, 1, &[0, 0, 0, 0]);
        bytes[2] = 0x0D;
        let r = reason(parse_idx_images(&bytes, src()).unwrap_err());
        assert!(
            r.contains("0x0d") && r.contains("f32") && r.contains("unsigned byte"),
            "{r}"
        );
    }

    #[test]
    fn truncated_and_trailing_data_are_refused() {
        let r =
            reason(parse_idx_images(&images_idx(60000, 28, 28, &[0; 1000]), src()).unwrap_err());
        assert!(
            r.contains("truncated: header promises 47040000 pixel bytes, file has 1000"),
            "{r}"
        );
        let r = reason(parse_idx_images(&images_idx(1, 2, 2, &[0; 5]), src()).unwrap_err());
        assert!(r.contains("1 trailing bytes"), "{r}");
        let mut labels = labels_idx(&[1, 2, 3]);
        labels.pop();
        let r = reason(parse_idx_labels(&labels, src()).unwrap_err());
        assert!(r.contains("truncated"), "{r}");
        labels.extend([3, 4]);
        let r = reason(parse_idx_labels(&labels, src()).unwrap_err());
        assert!(r.contains("trailing"), "{r}");
    }

    #[test]
    fn absurd_dimensions_error_without_allocating() {
        for (count, rows, cols) in [
            (u32::MAX, u32::MAX, u32::MAX),
            (u32::MAX, 28, 28),
            (1, u32::MAX, 1),
            (70_000, 65_535, 65_535),
        ] {
            let r =
                reason(parse_idx_images(&images_idx(count, rows, cols, &[]), src()).unwrap_err());
            assert!(r.contains("supported") || r.contains("overflow"), "{r}");
        }
        let r = reason(parse_idx_images(&images_idx(1, 0, 28, &[]), src()).unwrap_err());
        assert!(r.contains("empty"), "{r}");
        let mut labels = vec![0, 0, 8, 1];
        labels.extend(u32::MAX.to_be_bytes());
        let r = reason(parse_idx_labels(&labels, src()).unwrap_err());
        assert!(r.contains("supported"), "{r}");
        // A plausible header over too little data is "truncated", nothing more.
        let r = reason(parse_idx_images(&images_idx(1_000_000, 100, 100, &[]), src()).unwrap_err());
        assert!(r.contains("truncated"), "{r}");
    }

    #[test]
    fn corrupt_gzip_is_an_idx_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gz");
        let mut good = gzip(&images_idx(2, 4, 4, &[5; 32]));
        // Flip bytes in the deflate body.
        let mid = good.len() / 2;
        for b in &mut good[mid..mid + 4] {
            *b ^= 0xa5;
        }
        fs::write(&path, &good).unwrap();
        let r = reason(read_idx_file(&path).unwrap_err());
        assert!(r.contains("gzip"), "{r}");
        // Truncated gzip stream.
        let full = gzip(&images_idx(2, 4, 4, &[5; 32]));
        fs::write(&path, &full[..full.len() - 6]).unwrap();
        let r = reason(read_idx_file(&path).unwrap_err());
        assert!(r.contains("gzip"), "{r}");
        // Just the magic.
        fs::write(&path, GZIP_MAGIC).unwrap();
        let r = reason(read_idx_file(&path).unwrap_err());
        assert!(r.contains("gzip"), "{r}");
    }

    #[test]
    fn gzip_bomb_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.gz");
        fs::write(&path, gzip(&vec![0u8; 1 << 20])).unwrap();
        let r = reason(read_idx_file_capped(&path, 10_000).unwrap_err());
        assert!(r.contains("more than 10000 bytes"), "{r}");
        assert_eq!(read_idx_file_capped(&path, 1 << 20).unwrap().len(), 1 << 20);
        let raw = dir.path().join("big");
        fs::write(&raw, vec![0u8; 2000]).unwrap();
        let r = reason(read_idx_file_capped(&raw, 1000).unwrap_err());
        assert!(r.contains("larger than 1000"), "{r}");
    }

    #[test]
    fn missing_file_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope");
        match read_idx_file(&path) {
            Err(ParticipantError::Io { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io error, got {other:?}"),
        }
    }

    #[test]
    fn loads_raw_and_gzip_directories() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_dir(dir.path(), gz, (20, 10), (7, 3));
            let splits = load_idx_dir(dir.path()).unwrap();
            assert_eq!((splits.train.rows(), splits.train.cols()), (4, 3));
            assert_eq!(splits.train.len(), 20);
            assert_eq!(splits.test.len(), 7);
            assert_eq!(splits.train.num_classes(), 10);
            assert_eq!(splits.test.num_classes(), 10);
            assert_eq!(splits.classes, numbered_classes(10));
            assert_eq!(splits.classes[3], "3");
            assert!(is_idx_dir(dir.path()));
            assert_eq!(splits.train.label(13), 3);
            let expected: Vec<u8> = (12..24).map(|i| (i * 7 % 256) as u8).collect();
            assert_eq!(splits.train.image(1), expected.as_slice());
        }
    }

    #[test]
    fn raw_file_is_preferred_over_gzip() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), true, (20, 10), (7, 3));
        // A raw labels file next to the .gz one wins.
        fs::write(dir.path().join(TEST_LABELS), labels_idx(&[9; 7])).unwrap();
        let splits = load_idx_dir(dir.path()).unwrap();
        assert_eq!(splits.test.labels(), &[9; 7]);
    }

    #[test]
    fn num_classes_grows_past_ten() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), false, (30, 15), (5, 2));
        let splits = load_idx_dir(dir.path()).unwrap();
        assert_eq!(splits.train.num_classes(), 15);
        assert_eq!(splits.test.num_classes(), 15);
        assert_eq!(splits.classes.len(), 15);
        assert_eq!(splits.classes[14], "14");
    }

    #[test]
    fn label_count_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), false, (20, 10), (7, 3));
        fs::write(dir.path().join(TRAIN_LABELS), labels_idx(&[1; 19])).unwrap();
        match load_idx_dir(dir.path()) {
            Err(ParticipantError::Dataset(msg)) => {
                assert!(
                    msg.contains("20 images") && msg.contains("19 labels"),
                    "{msg}"
                );
            }
            other => panic!("expected a Dataset error, got {other:?}"),
        }
    }

    #[test]
    fn image_size_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), false, (20, 10), (7, 3));
        fs::write(dir.path().join(TEST_IMAGES), images_idx(7, 3, 4, &[0; 84])).unwrap();
        match load_idx_dir(dir.path()) {
            Err(ParticipantError::Dataset(msg)) => {
                assert!(msg.contains("4x3") && msg.contains("3x4"), "{msg}")
            }
            other => panic!("expected a Dataset error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_file_in_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), false, (20, 10), (7, 3));
        fs::write(dir.path().join(TEST_IMAGES), labels_idx(&[0; 7])).unwrap();
        match load_idx_dir(dir.path()) {
            Err(ParticipantError::Idx { path, reason }) => {
                assert_eq!(path, dir.path().join(TEST_IMAGES));
                assert!(reason.contains("labels file"), "{reason}");
            }
            other => panic!("expected an Idx error, got {other:?}"),
        }
    }

    #[test]
    fn missing_directory_and_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_idx_dir(dir.path()));
        match load_idx_dir(&dir.path().join("absent")) {
            Err(ParticipantError::Dataset(msg)) => assert!(msg.contains("does not exist"), "{msg}"),
            other => panic!("expected a Dataset error, got {other:?}"),
        }
        match load_idx_dir(dir.path()) {
            Err(ParticipantError::Dataset(msg)) => {
                assert!(
                    msg.contains("train-images-idx3-ubyte.gz") && msg.contains("empty"),
                    "{msg}"
                );
            }
            other => panic!("expected a Dataset error, got {other:?}"),
        }
        write_dir(dir.path(), true, (20, 10), (7, 3));
        fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        fs::write(dir.path().join("README"), "hi").unwrap();
        match load_idx_dir(dir.path()) {
            Err(ParticipantError::Dataset(msg)) => {
                assert!(msg.contains("neither t10k-labels-idx1-ubyte nor"), "{msg}");
                assert!(msg.contains("README, t10k-images-idx3-ubyte.gz"), "{msg}");
            }
            other => panic!("expected a Dataset error, got {other:?}"),
        }
    }

    #[test]
    fn loads_real_mnist_10k_when_present() {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/mnist-10k"
        ));
        if !dir.is_dir() {
            eprintln!("skipping: {} not present", dir.display());
            return;
        }
        let splits = load_idx_dir(dir).unwrap();
        assert_eq!(splits.train.len(), 7000);
        assert_eq!(splits.test.len(), 1500);
        for split in [&splits.train, &splits.test] {
            assert_eq!((split.rows(), split.cols()), (28, 28));
            assert_eq!(split.num_classes(), 10);
            let counts = split.class_counts();
            assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        }
    }
}
