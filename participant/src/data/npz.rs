//! MedMNIST-style `.npz` files: a zip archive of NumPy `.npy` arrays
//! (as written by `numpy.savez` or `numpy.savez_compressed`).
//!
//! Four arrays are read:
//!
//! - `train_images`, `test_images`: `uint8`, shape `[N, H, W]` or
//!   `[N, H, W, C]` with `C` = 1 (grey) or 3 (RGB, turned grey with the
//!   BT.601 weights, see [`super::decode::luma_bt601`]);
//! - `train_labels`, `test_labels`: any integer type, shape `[N]` or
//!   `[N, 1]`, values in `0..=255`.
//!
//! The classes are `"0"` to the largest label. Other arrays (MedMNIST's
//! `val_*`) are ignored. C and Fortran order are both read. The `.npy`
//! headers are parsed with `npyz`, after a size and nesting check of our
//! own; the archive is read with `zip` (stored or deflated entries).

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

use npyz::{DType, NpyFile, Order, TypeChar};
use zip::ZipArchive;
use zip::result::ZipError;

use super::decode::{GreyImage, check_image_size, luma_bt601, resize_grey};
use super::{Dataset, DatasetSplits, LoadOptions, numbered_classes};
use crate::error::{ParticipantError, Result};

/// Largest `.npy` header accepted, in bytes (NumPy's own default limit).
pub const MAX_NPY_HEADER: usize = 10_000;

/// Largest array accepted, in bytes of data (16 GiB): a guard against
/// decompression bombs and absurd headers.
pub const MAX_NPZ_ARRAY_BYTES: u64 = 16 << 30;

/// Deepest bracket nesting accepted in a `.npy` header (plain arrays need 2).
const MAX_HEADER_NESTING: usize = 8;

/// An array read from the archive: shape and raw little- or big-endian
/// items in C order.
struct Array {
    shape: Vec<usize>,
    dtype: npyz::TypeStr,
    data: Vec<u8>,
}

/// The shape tuple of a `.npy` header text, if it can be found and read.
fn header_shape(text: &str) -> Option<Vec<u64>> {
    let start = text.find("'shape'").or_else(|| text.find("\"shape\""))?;
    let rest = &text[start..];
    let open = rest.find('(')?;
    let close = rest[open..].find(')')? + open;
    rest[open + 1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// Reads the array `name` from `archive` (see the module documentation).
fn read_array<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    file: &Path,
    name: &str,
    available: &[String],
) -> Result<Array> {
    let err = |what: String| {
        ParticipantError::Dataset(format!("{}: array {name}: {what}", file.display()))
    };
    let mut entry = match archive.by_name(&format!("{name}.npy")) {
        Ok(e) => e,
        Err(ZipError::FileNotFound) => {
            return Err(err(format!(
                "missing (the file holds: {})",
                if available.is_empty() {
                    "no arrays".to_owned()
                } else {
                    available.join(", ")
                }
            )));
        }
        Err(e) => return Err(err(format!("cannot read it from the archive: {e}"))),
    };
    // Magic, version, header length: checked here so that npyz never sees
    // an oversized or deeply nested header, nor a shape whose size overflows.
    let mut pre = vec![0u8; 10];
    entry
        .read_exact(&mut pre)
        .map_err(|e| err(format!("truncated .npy header: {e}")))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(err("not a .npy array (bad magic)".into()));
    }
    let header_len = match pre[6] {
        1 => usize::from(u16::from_le_bytes([pre[8], pre[9]])),
        2 | 3 => {
            let mut more = [0u8; 2];
            entry
                .read_exact(&mut more)
                .map_err(|e| err(format!("truncated .npy header: {e}")))?;
            pre.extend_from_slice(&more);
            u32::from_le_bytes([pre[8], pre[9], more[0], more[1]]) as usize
        }
        v => return Err(err(format!("unsupported .npy version {v}"))),
    };
    if header_len > MAX_NPY_HEADER {
        return Err(err(format!(
            ".npy header of {header_len} bytes is over the limit of {MAX_NPY_HEADER}"
        )));
    }
    let mut header = vec![0u8; header_len];
    entry
        .read_exact(&mut header)
        .map_err(|e| err(format!("truncated .npy header: {e}")))?;
    let text = String::from_utf8_lossy(&header);
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_HEADER_NESTING {
            return Err(err(".npy header is nested too deeply".into()));
        }
    }
    if let Some(shape) = header_shape(&text) {
        let bytes = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(8));
        if bytes.is_none_or(|b| b > MAX_NPZ_ARRAY_BYTES) {
            return Err(err(format!(
                "shape {shape:?} is too large (at most {MAX_NPZ_ARRAY_BYTES} bytes per array)"
            )));
        }
    }
    pre.extend_from_slice(&header);
    let npy = NpyFile::new(Cursor::new(pre).chain(&mut entry))
        .map_err(|e| err(format!("invalid .npy header: {e}")))?;
    let dtype = match npy.header().dtype() {
        DType::Plain(t) => t,
        other => return Err(err(format!("unsupported dtype {}", other.descr()))),
    };
    let item = dtype
        .num_bytes()
        .ok_or_else(|| err(format!("unsupported dtype {dtype}")))?;
    let shape: Vec<usize> = npy.header().shape().iter().map(|&d| d as usize).collect();
    let order = npy.header().order();
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} is too large")))?;
    let bytes = count
        .checked_mul(item)
        .filter(|&b| b as u64 <= MAX_NPZ_ARRAY_BYTES)
        .ok_or_else(|| {
            err(format!(
                "shape {shape:?} of {dtype} is over the limit of {MAX_NPZ_ARRAY_BYTES} bytes"
            ))
        })?;
    let mut data = Vec::with_capacity(bytes.min(64 << 20));
    npy.into_inner()
        .take(bytes as u64)
        .read_to_end(&mut data)
        .map_err(|e| err(format!("cannot read the data: {e}")))?;
    if data.len() != bytes {
        return Err(err(format!(
            "truncated: shape {shape:?} of {dtype} needs {bytes} bytes of data, found {}",
            data.len()
        )));
    }
    if order == Order::Fortran && shape.len() > 1 {
        data = fortran_to_c(&data, &shape, item);
    }
    Ok(Array { shape, dtype, data })
}

/// Reorders the items of a Fortran-order (column-major) array to C order.
fn fortran_to_c(data: &[u8], shape: &[usize], item: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; shape.len()];
    let count = data.len() / item.max(1);
    for _ in 0..count {
        // Offset of `index` in Fortran order: the first axis varies fastest.
        let mut offset = 0;
        for (&i, &d) in index.iter().zip(shape).rev() {
            offset = offset * d + i;
        }
        out.extend_from_slice(&data[offset * item..(offset + 1) * item]);
        // Next index in C order: the last axis varies fastest.
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

/// The images of `array` as (rows, cols, grey pixels), resized when asked.
fn grey_images(
    array: Array,
    file: &Path,
    name: &str,
    image_size: Option<(usize, usize)>,
) -> Result<(usize, usize, usize, Vec<u8>)> {
    let err = |what: String| {
        ParticipantError::Dataset(format!("{}: array {name}: {what}", file.display()))
    };
    if array.dtype.type_char() != TypeChar::Uint || array.dtype.size_field() != 1 {
        return Err(err(format!("dtype {} is not uint8 (|u1)", array.dtype)));
    }
    let (n, rows, cols, channels) = match array.shape[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] if c == 1 || c == 3 => (n, h, w, c),
        _ => {
            return Err(err(format!(
                "shape {:?} is not [N, H, W] or [N, H, W, C] with C = 1 or 3",
                array.shape
            )));
        }
    };
    if n == 0 {
        return Err(err("holds no images".into()));
    }
    if rows == 0 || cols == 0 {
        return Err(err(format!("images are {rows}x{cols}, empty")));
    }
    let grey: Vec<u8> = if channels == 3 {
        array
            .data
            .chunks_exact(3)
            .map(|p| luma_bt601(p[0], p[1], p[2]))
            .collect()
    } else {
        array.data
    };
    match image_size {
        Some((r, c)) if (r, c) != (rows, cols) => {
            let mut out = Vec::with_capacity(n * r * c);
            for pixels in grey.chunks_exact(rows * cols) {
                let img = GreyImage {
                    rows,
                    cols,
                    pixels: pixels.to_vec(),
                };
                out.extend(resize_grey(&img, r, c).pixels);
            }
            Ok((n, r, c, out))
        }
        _ => Ok((n, rows, cols, grey)),
    }
}

/// The labels of `array`: integers of any width and byte order, shape
/// `[N]` or `[N, 1]`, each in `0..=255`.
fn read_labels(array: Array, file: &Path, name: &str) -> Result<Vec<u8>> {
    let err = |what: String| {
        ParticipantError::Dataset(format!("{}: array {name}: {what}", file.display()))
    };
    let t = array.dtype;
    let signed = match t.type_char() {
        TypeChar::Int => true,
        TypeChar::Uint => false,
        _ => return Err(err(format!("dtype {t} is not an integer type"))),
    };
    let size = t.size_field() as usize;
    if ![1, 2, 4, 8].contains(&size) {
        return Err(err(format!("dtype {t} is not an integer type")));
    }
    match array.shape[..] {
        [_] | [_, 1] => {}
        _ => {
            return Err(err(format!(
                "shape {:?} is not [N] or [N, 1] (one label per image)",
                array.shape
            )));
        }
    }
    let big = t.endianness() == npyz::Endianness::Big;
    array
        .data
        .chunks_exact(size)
        .enumerate()
        .map(|(i, b)| {
            // Little-endian, sign-extended to 8 bytes.
            let mut le = [0u8; 8];
            for (k, byte) in le[..size].iter_mut().enumerate() {
                *byte = if big { b[size - 1 - k] } else { b[k] };
            }
            if signed && le[size - 1] & 0x80 != 0 {
                le[size..].fill(0xff);
            }
            let v = if signed {
                i128::from(i64::from_le_bytes(le))
            } else {
                i128::from(u64::from_le_bytes(le))
            };
            u8::try_from(v).map_err(|_| err(format!("label {v} of sample {i} is not in 0..=255")))
        })
        .collect()
}

/// Loads a MedMNIST-style `.npz` file (see the module documentation).
/// [`LoadOptions::image_size`] resizes the images; the test fraction and
/// seed are not used (the file has its own test split) and the samples keep
/// the file's order.
pub fn load_npz(path: &Path, options: &LoadOptions) -> Result<DatasetSplits> {
    if let Some(size) = options.image_size {
        check_image_size(size)?;
    }
    let file = File::open(path).map_err(|e| ParticipantError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut archive = ZipArchive::new(BufReader::new(file)).map_err(|e| {
        ParticipantError::Dataset(format!(
            "{}: not a readable .npz (zip) archive: {e}",
            path.display()
        ))
    })?;
    let mut available: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok())
        .filter_map(|n| n.strip_suffix(".npy").map(str::to_owned))
        .collect();
    available.sort();
    let mut split = |images: &str, labels_name: &str| -> Result<(usize, usize, Vec<u8>, Vec<u8>)> {
        let (n, rows, cols, pixels) = grey_images(
            read_array(&mut archive, path, images, &available)?,
            path,
            images,
            options.image_size,
        )?;
        let labels = read_labels(
            read_array(&mut archive, path, labels_name, &available)?,
            path,
            labels_name,
        )?;
        if labels.len() != n {
            return Err(ParticipantError::Dataset(format!(
                "{}: array {labels_name} holds {} labels for the {n} images of {images}",
                path.display(),
                labels.len()
            )));
        }
        Ok((rows, cols, pixels, labels))
    };
    let (rows, cols, train_pixels, train_labels) = split("train_images", "train_labels")?;
    let (test_rows, test_cols, test_pixels, test_labels) = split("test_images", "test_labels")?;
    if (rows, cols) != (test_rows, test_cols) {
        return Err(ParticipantError::Dataset(format!(
            "{}: train_images are {rows}x{cols} but test_images are {test_rows}x{test_cols}; \
             pass --image-size HxW to resize both",
            path.display()
        )));
    }
    let num_classes = 1 + *train_labels.iter().chain(&test_labels).max().unwrap_or(&0) as usize;
    DatasetSplits::new(
        Dataset::new(rows, cols, num_classes, train_pixels, train_labels)?,
        Dataset::new(rows, cols, num_classes, test_pixels, test_labels)?,
        numbered_classes(num_classes),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use npyz::WriterBuilder;
    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    use super::*;
    use crate::data::decode::tests::message;

    /// A `.npy` file of `data` with `shape`.
    fn npy<T: npyz::AutoSerialize + Copy>(shape: &[u64], data: &[T]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(&mut out)
            .begin_nd()
            .unwrap();
        w.extend(data.iter().copied()).unwrap();
        w.finish().unwrap();
        out
    }

    /// A `.npy` file with a hand-written header (for shapes and orders
    /// npyz's writer will not produce) followed by `data`.
    fn raw_npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut text = header.to_owned();
        while !(10 + text.len() + 1).is_multiple_of(64) {
            text.push(' ');
        }
        text.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((text.len() as u16).to_le_bytes());
        out.extend(text.as_bytes());
        out.extend(data);
        out
    }

    /// Writes an archive of `arrays`, deflated or stored.
    fn write_npz(path: &Path, arrays: &[(&str, Vec<u8>)], deflate: bool) {
        let mut zip = ZipWriter::new(File::create(path).unwrap());
        let method = if deflate {
            CompressionMethod::Deflated
        } else {
            CompressionMethod::Stored
        };
        for (name, bytes) in arrays {
            zip.start_file(
                format!("{name}.npy"),
                SimpleFileOptions::default().compression_method(method),
            )
            .unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    /// Grey 2x3 images: image `i` has pixels `10 * i + j`.
    fn grey(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| (0..6).map(move |j| (10 * i + j) as u8))
            .collect()
    }

    fn standard(train_labels: Vec<u8>, test_labels: Vec<u8>) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("train_images", npy(&[3, 2, 3], &grey(3))),
            ("train_labels", train_labels),
            ("test_images", npy(&[2, 2, 3], &grey(2))),
            ("test_labels", test_labels),
            ("val_images", npy(&[1, 2, 3], &grey(1))),
        ]
    }

    fn opts() -> LoadOptions {
        LoadOptions::default()
    }

    #[test]
    fn reads_grey_images_and_labels_of_any_integer_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.npz");
        for deflate in [false, true] {
            let arrays = standard(npy(&[3, 1], &[0i64, 4, 2]), npy(&[2], &[1u16, 0]));
            write_npz(&path, &arrays, deflate);
            let s = load_npz(&path, &opts()).unwrap();
            assert_eq!((s.train.rows(), s.train.cols()), (2, 3));
            assert_eq!(s.train.pixels(), grey(3));
            assert_eq!(s.train.labels(), [0, 4, 2]);
            assert_eq!(s.test.labels(), [1, 0]);
            assert_eq!(s.classes, ["0", "1", "2", "3", "4"]);
        }
        // Big-endian and signed 8-bit labels.
        let arrays = standard(
            raw_npy(
                "{'descr': '>i4', 'fortran_order': False, 'shape': (3,), }",
                &[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0],
            ),
            npy(&[2], &[3i8, 2]),
        );
        write_npz(&path, &arrays, true);
        let s = load_npz(&path, &opts()).unwrap();
        assert_eq!(s.train.labels(), [7, 1, 0]);
        assert_eq!(s.test.labels(), [3, 2]);
        assert_eq!(s.classes.len(), 8);
    }

    #[test]
    fn rgb_images_turn_grey_and_resize() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rgb.npz");
        let rgb: Vec<u8> = [10u8, 200, 30].repeat(2 * 4 * 4);
        let arrays = vec![
            ("train_images", npy(&[2, 4, 4, 3], &rgb)),
            ("train_labels", npy(&[2], &[0u8, 1])),
            ("test_images", npy(&[1, 4, 4, 1], &[9u8; 16])),
            ("test_labels", npy(&[1], &[1u8])),
        ];
        write_npz(&path, &arrays, true);
        let s = load_npz(&path, &opts()).unwrap();
        assert_eq!(s.train.pixels(), [124; 32]);
        assert_eq!(s.test.pixels(), [9; 16]);
        let sized = LoadOptions {
            image_size: Some((2, 3)),
            ..opts()
        };
        let s = load_npz(&path, &sized).unwrap();
        assert_eq!((s.train.rows(), s.train.cols()), (2, 3));
        assert_eq!(s.train.pixels(), [124; 12]);
        assert_eq!(s.test.pixels(), [9; 6]);
    }

    #[test]
    fn fortran_order_is_reordered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.npz");
        // C-order image i, row r, col c = 100 i + 10 r + c; stored column-major.
        let (n, h, w) = (2, 2, 3);
        let mut fortran = Vec::new();
        for c in 0..w {
            for r in 0..h {
                for i in 0..n {
                    fortran.push((100 * i + 10 * r + c) as u8);
                }
            }
        }
        let mut arrays = standard(npy(&[3], &[0u8, 1, 2]), npy(&[2], &[0u8, 1]));
        arrays[0] = (
            "train_images",
            raw_npy(
                "{'descr': '|u1', 'fortran_order': True, 'shape': (2, 2, 3), }",
                &fortran,
            ),
        );
        arrays[1] = ("train_labels", npy(&[2], &[0u8, 1]));
        write_npz(&path, &arrays, false);
        let s = load_npz(&path, &opts()).unwrap();
        assert_eq!(s.train.image(0), [0, 1, 2, 10, 11, 12]);
        assert_eq!(s.train.image(1), [100, 101, 102, 110, 111, 112]);
    }

    #[test]
    fn bad_archives_name_the_file_and_array() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.npz");
        let check = |arrays: Vec<(&str, Vec<u8>)>, wanted: &[&str]| {
            write_npz(&path, &arrays, true);
            let m = message(load_npz(&path, &opts()));
            assert!(m.contains("bad.npz"), "{m}");
            for w in wanted {
                assert!(m.contains(w), "{m} lacks {w}");
            }
        };
        let ok_labels = || npy(&[3], &[0u8, 1, 2]);
        let ok_test = || npy(&[2], &[0u8, 1]);
        // Missing array.
        let mut a = standard(ok_labels(), ok_test());
        a.remove(3);
        check(a, &["test_labels", "missing", "train_images"]);
        // Wrong image dtype.
        let mut a = standard(ok_labels(), ok_test());
        a[0] = ("train_images", npy(&[3, 2, 3], &[0.5f32; 18]));
        check(a, &["train_images", "<f4", "uint8"]);
        // Float labels.
        check(
            standard(npy(&[3], &[0.0f64, 1.0, 2.0]), ok_test()),
            &["train_labels", "integer"],
        );
        // Label count mismatch.
        check(
            standard(npy(&[4], &[0u8, 1, 2, 3]), ok_test()),
            &["train_labels", "4 labels", "3 images"],
        );
        // Labels out of range.
        check(
            standard(npy(&[3], &[0i32, 256, 1]), ok_test()),
            &["train_labels", "256", "sample 1"],
        );
        check(
            standard(ok_labels(), npy(&[2], &[0i64, -3])),
            &["test_labels", "-3"],
        );
        // Multi-label shape.
        check(
            standard(npy(&[3, 2], &[0u8; 6]), ok_test()),
            &["train_labels", "[3, 2]"],
        );
        // Image shape.
        let mut a = standard(ok_labels(), ok_test());
        a[0] = ("train_images", npy(&[3, 6], &grey(3)));
        check(a, &["train_images", "[3, 6]"]);
        let mut a = standard(ok_labels(), ok_test());
        a[2] = ("test_images", npy(&[2, 2, 2, 4], &[0u8; 32]));
        check(a, &["test_images", "C = 1 or 3"]);
        // Truncated data and absurd shapes.
        let mut a = standard(ok_labels(), ok_test());
        a[0] = (
            "train_images",
            raw_npy(
                "{'descr': '|u1', 'fortran_order': False, 'shape': (3, 2, 3), }",
                &[1; 10],
            ),
        );
        check(a, &["train_images", "truncated", "18 bytes"]);
        let mut a = standard(ok_labels(), ok_test());
        a[0] = (
            "train_images",
            raw_npy(
                "{'descr': '|u1', 'fortran_order': False, 'shape': (4294967296, 4294967296, 3), }",
                &[],
            ),
        );
        check(a, &["train_images", "too large"]);
        let mut a = standard(ok_labels(), ok_test());
        a[0] = ("train_images", b"not numpy at all".to_vec());
        check(a, &["train_images", "bad magic"]);
        let mut a = standard(ok_labels(), ok_test());
        a[0] = (
            "train_images",
            raw_npy(
                &format!("{{'descr': {}'|u1'{}}}", "[".repeat(50), "]".repeat(50)),
                &[],
            ),
        );
        check(a, &["train_images", "nested"]);
        // Not a zip file at all.
        std::fs::write(&path, "hello").unwrap();
        let m = message(load_npz(&path, &opts()));
        assert!(m.contains("bad.npz") && m.contains("zip"), "{m}");
    }
}
