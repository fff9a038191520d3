//! Learnable image encryption keyed by the participants' shared 256-bit
//! image key: block scrambling (Kiya et al., "EtC"), Tanaka's learnable
//! encryption on 4-bit halves (2018) and pixel-based encryption
//! (Sirichotedumrong, Kinoshita and Kiya, 2019), composable step by step.
//! The modes and step names are defined by
//! [`greyfed_protocol::cipher::CipherSteps`].
//!
//! The coordinator never sees the [`ImageKey`]; participants encrypt their
//! images with an [`ImageCipher`] before training. Without `per-block`
//! and pixel-based steps the encryption is exactly absorbed by a
//! re-parametrisation of a model whose first layer is a convolution with
//! kernel = stride = block size: the block permutation permutes the MLP's
//! input weights, the intra-block map permutes the kernel, and the
//! negative-positive step (`p -> 255 - p`, which equals `p ^ 0xFF` on `u8`)
//! is a sign flip of the centred input and folds into the kernel's sign.
//! `per-block` (the "extended" variant) and the pixel-based steps draw a
//! different transform for every block or pixel position: stronger, but no
//! longer exactly learnable by a shared kernel.
//!
//! # Specification (version 1)
//!
//! This section is normative: the transform is reproducible from the key,
//! the steps, the block size and the image size alone, and the known-answer
//! tests in this module pin it.
//!
//! ## Geometry
//!
//! Images are `rows x cols`, row-major, one `u8` per pixel. The block size
//! `B >= 1` must divide both `rows` and `cols`. Blocks are numbered
//! row-major: block `q` has block row `q / (cols / B)` and block column
//! `q % (cols / B)`; there are `nb = (rows / B) * (cols / B)` blocks. Inside
//! a block, pixel `(r, c)` (`0 <= r, c < B`) has in-block index `r * B + c`.
//!
//! ## Key derivation
//!
//! Every keyed value comes from its own stream. For a `purpose` and a
//! position label `pos` (the decimal destination block index `q`, or `all`):
//!
//! 1. `seed = HKDF-SHA256(salt = "greyfed/image-cipher/v1", ikm = key,
//!    info = "<purpose>|B=<B>|<rows>x<cols>|pos=<pos>")`, 32 bytes of output
//!    (RFC 5869; all numbers in decimal ASCII, e.g.
//!    `block-permutation|B=4|28x28|pos=all`).
//! 2. The stream is the IETF ChaCha20 keystream (RFC 8439; 96-bit nonce,
//!    32-bit block counter starting at 0) under `key = seed`,
//!    `nonce = 12 zero bytes`, i.e. ChaCha20 applied to a buffer of zeros.
//! 3. A *word* is the next 4 stream bytes read as a little-endian `u32`; a
//!    *byte* is the next stream byte. Each stream is consumed either only as
//!    words or only as bytes.
//! 4. `uniform(n)` (for `1 <= n <= 2^32 - 1`): draw words `w` until
//!    `w < floor(2^32 / n) * n`, then return `w mod n` (rejection sampling,
//!    unbiased).
//! 5. `permutation(n)`: start from the identity `p = [0, 1, .., n-1]`; for
//!    `i` from `n - 1` down to `1`: `j = uniform(i + 1)`, swap `p[i]` and
//!    `p[j]` (Fisher–Yates).
//! 6. `bits(n)`: `n` bytes, bit `k` is `byte_k & 1`.
//!
//! Purposes and what they derive:
//!
//! | purpose             | `pos`                | value                                   |
//! |---------------------|----------------------|-----------------------------------------|
//! | `block-permutation` | `all`                | `pi = permutation(nb)`                  |
//! | `rotate-flip`       | `all` or `q`         | dihedral index `t = uniform(8)`         |
//! | `pixel-shuffle`     | `all` or `q`         | `sigma = permutation(V)`                |
//! | `negative-positive` | `all` or `q`         | mask `m = bits(V)`                      |
//! | `component-shuffle` | `all`                | swap bits `s = bits(rows * cols)`       |
//! | `pixel-negative-positive` | `all`          | flip bits `f = bits(I * rows * cols)`   |
//!
//! Here `I` is the number of value planes (1, or 2 with `split`) and
//! `V = I * B * B` the number of values in a block. With `split` the HKDF
//! info carries `|C=2` before `|pos=`
//! (`pixel-shuffle|B=4|28x28|C=2|pos=all`), so split and 8-bit modes
//! never share a stream.
//!
//! Without `per-block` the three intra-block values use `pos=all` and are
//! the same for every block; with `per-block` they are derived separately
//! for every destination block `q` with `pos=q`.
//! A disabled step is the identity (`pi`, `sigma` identity, `t = 0`, `m` all
//! zero) and nothing is derived for it; enabling or disabling one step never
//! changes the values of the others. For `B = 1` rotate/flip and pixel
//! shuffle are the identity.
//!
//! ## Encryption
//!
//! 0. Values: without `split` the values are the pixels (`I = 1`). With
//!    `split` ([`split_pixels`]) pixel `p` becomes two values, `(p >> 4) * 17`
//!    in plane 0 and `(p & 15) * 17` in plane 1 (`I = 2`); a 4-bit half `h`
//!    is stored as the byte with both nibbles `h`, so inverting it
//!    (`h -> 15 - h`) is again `^ 0xFF`. Value index `ch * rows * cols +
//!    row * cols + col`; in-block index `d = ch * B * B + r * B + c`.
//!
//! Destination block `q` of the cipher image is built from plain block
//! `P = pi[q]` in three steps (with `t`, `sigma`, `m` of `q` or shared):
//!
//! 1. Rotate/flip (dihedral transform `t = 4 * f + k`), the same in every
//!    plane: first, if `f = 1`, mirror left-right, `F[r][c] = X[r][B-1-c]`
//!    (else `F = X`); then rotate `k` times by 90 degrees clockwise, one
//!    rotation being `R[r][c] = F[B-1-c][r]`.
//! 2. Value shuffle: `S[d] = R[sigma[d]]` for in-block indices `d` (with
//!    `split` across both planes: Tanaka's shuffle of the `2 * B * B`
//!    half-values).
//! 3. Negative-positive: `C[d] = S[d] ^ 0xFF` if `m[d] = 1`, else `S[d]`.
//!
//! Then the pixel-based steps, on the whole image:
//!
//! 4. Component shuffle (needs `split`): where `s[i] = 1`, the values of
//!    pixel `i` in plane 0 and plane 1 trade places.
//! 5. Pixel negative-positive: value `v` is inverted (`^ 0xFF`) where
//!    `f[v] = 1`.
//!
//! The whole composition is a value permutation plus an XOR mask:
//! `cipher[d] = values[source[d]] ^ xor[d]` with `xor[d]` in `{0x00, 0xFF}`;
//! decryption is `values[source[d]] = cipher[d] ^ xor[d]`, then (with
//! `split`) [`merge_pixels`].
//!
//! The image key has 256 bits; [`ImageCipher::key_space_bits`] reports the
//! size of the transform family, which is far larger for realistic images
//! but only reachable through the 256-bit key. None of this is a cipher in
//! the cryptographic sense: see `docs/threat-model.md` for the attacks and
//! what they recover.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use greyfed_protocol::cipher::{CipherSpec, CipherSteps};
use hkdf::Hkdf;
use rand::TryRng;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::data::Dataset;
use crate::error::{ParticipantError, Result};

/// Length of an [`ImageKey`] in bytes.
pub const KEY_LEN: usize = 32;

/// HKDF salt of the version-1 key derivation (see the module documentation).
pub const KDF_SALT: &[u8] = b"greyfed/image-cipher/v1";

/// Domain-separation prefix hashed before the key for its fingerprint.
const FINGERPRINT_DOMAIN: &[u8] = b"greyfed image key fingerprint v1";

/// Key files larger than this are rejected without being read.
const MAX_KEY_FILE_BYTES: u64 = 1024;

/// The participants' shared secret 256-bit image key.
///
/// The bytes are wiped when the key is dropped. `Debug` and `Display` show
/// only the [fingerprint](ImageKey::fingerprint), never the key.
#[derive(Clone, ZeroizeOnDrop)]
pub struct ImageKey([u8; KEY_LEN]);

impl ImageKey {
    /// Draws a fresh key from the operating system's random number generator.
    ///
    /// # Panics
    ///
    /// If the operating system cannot provide randomness (as `rand::rng()`
    /// would also do); no key is better than a weak one.
    pub fn generate() -> ImageKey {
        let mut key = ImageKey([0; KEY_LEN]);
        if let Err(e) = rand::rngs::SysRng.try_fill_bytes(&mut key.0) {
            panic!("the operating system's random number generator failed: {e}");
        }
        key
    }

    /// Wraps existing key bytes (the caller should wipe its copy).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ImageKey {
        ImageKey(bytes)
    }

    /// The key bytes, for deriving other secrets from the key (the layer
    /// mask); never log them.
    pub(crate) fn secret_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key as 64 lower-case hex characters. Secret: only for writing key
    /// files; never log it.
    pub fn expose_secret_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A 16-hex-character identifier, safe to log and compare between
    /// participants: the first 8 bytes of
    /// `SHA-256("greyfed image key fingerprint v1" || key)`.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        hasher.update(self.0);
        let digest = hasher.finalize();
        hex::encode(&digest[..8])
    }

    /// Reads a key file: one line of 64 hex characters (either case;
    /// surrounding whitespace ignored).
    ///
    /// On unix the file must not be accessible by group or others. Errors
    /// never contain the file's contents.
    pub fn read_file(path: impl AsRef<Path>) -> Result<ImageKey> {
        let path = path.as_ref();
        let key_error = |reason: String| ParticipantError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let io_error = |source: io::Error| ParticipantError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(key_error("file not found".to_string()));
            }
            Err(e) => return Err(io_error(e)),
        };
        let meta = file.metadata().map_err(io_error)?;
        if !meta.is_file() {
            return Err(key_error("not a regular file".to_string()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(key_error(format!(
                    "permissions {mode:04o} let group or others access the key; \
                     restrict them with `chmod 600 {}`",
                    path.display()
                )));
            }
        }
        if meta.len() > MAX_KEY_FILE_BYTES {
            return Err(key_error(format!(
                "file has {} bytes; expected 64 hex characters (32 bytes)",
                meta.len()
            )));
        }
        let mut contents = Zeroizing::new(Vec::with_capacity(128));
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut contents)
            .map_err(io_error)?;
        parse_hex_key(&contents).map_err(key_error)
    }

    /// Parses a key file's contents (what [`ImageKey::read_file`] checks
    /// after reading): 64 hex characters, surrounding whitespace ignored.
    /// The error (the reason only) never quotes the contents.
    pub fn parse_key_file_contents(contents: &[u8]) -> std::result::Result<ImageKey, String> {
        parse_hex_key(contents)
    }

    /// Writes the key as one line of hex to a new file, readable only by its
    /// owner (created with mode `0600` on unix). Refuses to overwrite an
    /// existing file.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = match options.open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ParticipantError::KeyFile {
                    path: path.to_path_buf(),
                    reason: "file already exists; refusing to overwrite an image key".to_string(),
                });
            }
            Err(source) => {
                return Err(ParticipantError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut line = Zeroizing::new([0u8; 2 * KEY_LEN + 1]);
        hex::encode_to_slice(self.0, &mut line[..2 * KEY_LEN])
            .map_err(|e| ParticipantError::Cipher(format!("hex encoding failed: {e}")))?;
        line[2 * KEY_LEN] = b'\n';
        if let Err(source) = file.write_all(&line[..]).and_then(|()| file.sync_all()) {
            drop(file);
            // Best effort: do not leave a truncated key file behind.
            let _ = fs::remove_file(path);
            return Err(ParticipantError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageKey")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl fmt::Display for ImageKey {
    /// Writes the fingerprint only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// Parses trimmed key-file contents; the error (a reason) never quotes them.
fn parse_hex_key(contents: &[u8]) -> std::result::Result<ImageKey, String> {
    const EXPECTED: &str = "expected 64 hex characters (32 bytes)";
    let Ok(text) = std::str::from_utf8(contents.trim_ascii()) else {
        return Err(format!("not text; {EXPECTED}"));
    };
    if let Some(i) = text.chars().position(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "character {} is not a hex digit (0-9, a-f, A-F); {EXPECTED}",
            i + 1
        ));
    }
    if text.len() != 2 * KEY_LEN {
        return Err(format!("{EXPECTED}, found {}", text.len()));
    }
    let mut key = ImageKey([0; KEY_LEN]);
    hex::decode_to_slice(text, &mut key.0).map_err(|_| format!("not valid hex; {EXPECTED}"))?;
    Ok(key)
}

/// The keyed transform applied inside one block: a map from destination
/// in-block index to source in-block index, plus the negative-positive mask.
///
/// In-block indices are `ch * B * B + r * B + c` (plane, then row-major);
/// there is one plane, or two with `split`. `Debug` shows only the size: the
/// tables are as secret as the key for these images.
#[derive(Clone, PartialEq, Eq)]
pub struct BlockTransform {
    dihedral: u8,
    source: Vec<usize>,
    negated: Vec<bool>,
}

impl BlockTransform {
    /// The rotate/flip index `t = 4 * f + k` (0 when disabled or `B = 1`).
    pub fn dihedral(&self) -> u8 {
        self.dihedral
    }

    /// `source()[d]`: which in-block value of the (source) plain block lands
    /// at in-block index `d` (rotation/flip and shuffle combined).
    pub fn source(&self) -> &[usize] {
        &self.source
    }

    /// `negated()[d]`: whether destination in-block value `d` is inverted
    /// (`v -> 255 - v`).
    pub fn negated(&self) -> &[bool] {
        &self.negated
    }
}

impl fmt::Debug for BlockTransform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockTransform")
            .field("values", &self.source.len())
            .finish_non_exhaustive()
    }
}

impl Drop for BlockTransform {
    fn drop(&mut self) {
        self.dihedral.zeroize();
        self.source.zeroize();
        self.negated.zeroize();
    }
}

/// Splits 8-bit pixels into their public two-plane representation: plane 0
/// holds `(p >> 4) * 17` of every pixel, plane 1 `(p & 15) * 17` (a 4-bit
/// half `h` becomes the byte with both nibbles `h`, so inverting it is
/// `^ 0xFF`, exactly like an 8-bit pixel).
pub fn split_pixels(pixels: &[u8], out: &mut [u8]) {
    for (v, o) in out.iter_mut().enumerate().take(2 * pixels.len()) {
        *o = split_value(pixels, v);
    }
}

/// Value `v` of the split planes of `pixels` (see [`split_pixels`]).
fn split_value(pixels: &[u8], v: usize) -> u8 {
    let n = pixels.len();
    if v < n {
        (pixels[v] >> 4) * 17
    } else {
        (pixels[v - n] & 15) * 17
    }
}

/// Inverse of [`split_pixels`]: reads the high half from plane 0 and the
/// low half from plane 1 (the low nibble of each value).
pub fn merge_pixels(values: &[u8], out: &mut [u8]) {
    let (high, low) = values.split_at(out.len());
    for ((o, &h), &l) in out.iter_mut().zip(high).zip(low) {
        *o = ((h & 15) << 4) | (l & 15);
    }
}

/// Encrypts and decrypts images of one size under one key and mode; all
/// keyed tables are derived once, in [`ImageCipher::new`].
pub struct ImageCipher {
    steps: CipherSteps,
    block_size: usize,
    rows: usize,
    cols: usize,
    key_fingerprint: String,
    block_permutation: Vec<usize>,
    transforms: Vec<BlockTransform>,
    source: Vec<usize>,
    xor: Vec<u8>,
}

impl fmt::Debug for ImageCipher {
    /// Shows the mode, size and key fingerprint, not the tables.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageCipher")
            .field("mode", &self.steps.to_string())
            .field("block_size", &self.block_size)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("key_fingerprint", &self.key_fingerprint)
            .finish_non_exhaustive()
    }
}

impl Drop for ImageCipher {
    fn drop(&mut self) {
        self.block_permutation.zeroize();
        self.source.zeroize();
        self.xor.zeroize();
    }
}

impl ImageCipher {
    /// Derives the transform of `steps` with block size `block_size` for
    /// `rows x cols` images from `key` (see the module documentation for the
    /// specification).
    pub fn new(
        key: &ImageKey,
        steps: CipherSteps,
        block_size: usize,
        rows: usize,
        cols: usize,
    ) -> Result<ImageCipher> {
        steps.validate().map_err(ParticipantError::Cipher)?;
        validate_geometry(block_size, rows, cols)?;
        let b = block_size;
        let planes = steps.output_channels() as usize;
        let plane_len = rows * cols;
        let blocks_per_row = cols / b;
        let num_blocks = (rows / b) * blocks_per_row;
        let kdf = Kdf {
            key,
            block_size: b,
            rows,
            cols,
            split: steps.split,
        };

        let block_permutation = if steps.block_shuffle {
            kdf.stream("block-permutation", None)?
                .permutation(num_blocks)
        } else {
            (0..num_blocks).collect()
        };
        let transforms = if steps.per_block {
            (0..num_blocks)
                .map(|q| kdf.block_transform(&steps, Some(q)))
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![kdf.block_transform(&steps, None)?]
        };

        // Block-wise steps: a map between in-block values of blocks.
        let bb = b * b;
        let value = |block: usize, d: usize| {
            let (ch, r, c) = (d / bb, d % bb / b, d % b);
            let (row, col) = (
                block / blocks_per_row * b + r,
                block % blocks_per_row * b + c,
            );
            ch * plane_len + row * cols + col
        };
        let mut source = vec![0; planes * plane_len];
        let mut xor = vec![0; planes * plane_len];
        for (q, &p) in block_permutation.iter().enumerate() {
            let transform = &transforms[if transforms.len() == 1 { 0 } else { q }];
            for d in 0..planes * bb {
                let dst = value(q, d);
                source[dst] = value(p, transform.source[d]);
                xor[dst] = if transform.negated[d] { 0xFF } else { 0 };
            }
        }
        // Pixel-based steps, on the whole image.
        if steps.component_shuffle {
            let swap = kdf.stream("component-shuffle", None)?.bits(plane_len);
            for (pixel, _) in swap.iter().enumerate().filter(|(_, s)| **s) {
                source.swap(pixel, plane_len + pixel);
                xor.swap(pixel, plane_len + pixel);
            }
        }
        if steps.pixel_negative_positive {
            let flip = kdf
                .stream("pixel-negative-positive", None)?
                .bits(planes * plane_len);
            for (x, _) in xor.iter_mut().zip(&flip).filter(|(_, f)| **f) {
                *x ^= 0xFF;
            }
        }

        Ok(ImageCipher {
            steps,
            block_size,
            rows,
            cols,
            key_fingerprint: key.fingerprint(),
            block_permutation,
            transforms,
            source,
            xor,
        })
    }

    /// Builds the cipher a [`CipherSpec`] describes, refusing a key whose
    /// fingerprint is not the spec's `key_id`.
    pub fn from_spec(
        key: &ImageKey,
        spec: &CipherSpec,
        rows: usize,
        cols: usize,
    ) -> Result<ImageCipher> {
        if key.fingerprint() != spec.key_id {
            return Err(ParticipantError::Cipher(format!(
                "the image key has fingerprint {}, but the model expects images encrypted \
                 under key {}",
                key.fingerprint(),
                spec.key_id
            )));
        }
        ImageCipher::new(key, spec.steps, spec.block_size as usize, rows, cols)
    }

    /// The public description of this cipher: mode, block size and key
    /// fingerprint.
    pub fn spec(&self) -> CipherSpec {
        CipherSpec {
            steps: self.steps,
            block_size: self.block_size as u32,
            key_id: self.key_fingerprint.clone(),
        }
    }

    /// The steps this cipher applies.
    pub fn steps(&self) -> CipherSteps {
        self.steps
    }

    /// Block side of the block-wise steps.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Image height this cipher works on.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Image width this cipher works on.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Planes of a cipher image: 2 with `split`, else 1.
    pub fn channels(&self) -> usize {
        self.steps.output_channels() as usize
    }

    /// Pixels per plain image (`rows * cols`).
    pub fn image_len(&self) -> usize {
        self.rows * self.cols
    }

    /// Values per cipher image (`channels * rows * cols`).
    pub fn cipher_len(&self) -> usize {
        self.source.len()
    }

    /// Number of blocks per image.
    pub fn num_blocks(&self) -> usize {
        self.block_permutation.len()
    }

    /// The fingerprint of the key the tables were derived from.
    pub fn key_fingerprint(&self) -> &str {
        &self.key_fingerprint
    }

    /// `block_permutation()[q]`: the plain block whose values fill cipher
    /// block `q` (blocks numbered row-major).
    pub fn block_permutation(&self) -> &[usize] {
        &self.block_permutation
    }

    /// The intra-block transform of cipher block `position`; without
    /// `per-block` the same for every position. `None` when
    /// `position >= num_blocks()`.
    pub fn intra_block_transform(&self, position: usize) -> Option<&BlockTransform> {
        if position >= self.num_blocks() {
            None
        } else if self.transforms.len() == 1 {
            self.transforms.first()
        } else {
            self.transforms.get(position)
        }
    }

    /// `value_source()[d]`: the plain value (index into the plain image, or
    /// into its [split](split_pixels) planes) that lands at cipher value `d`.
    pub fn value_source(&self) -> &[usize] {
        &self.source
    }

    /// `value_xor()[d]`: `0xFF` where cipher value `d` is inverted, else `0`.
    pub fn value_xor(&self) -> &[u8] {
        &self.xor
    }

    /// Encrypts one image of `rows * cols` pixels into `out`
    /// (`channels * rows * cols` values): `out[d] = values[source[d]] ^ xor[d]`
    /// where `values` is the image, or its split planes.
    pub fn encrypt_image(&self, plain: &[u8], out: &mut [u8]) -> Result<()> {
        self.check_len("plain image", plain.len(), self.image_len())?;
        self.check_len("output image", out.len(), self.cipher_len())?;
        self.encrypt_unchecked(plain, out);
        Ok(())
    }

    /// Decrypts one cipher image (`channels * rows * cols` values) into
    /// `out` (`rows * cols` pixels).
    pub fn decrypt_image(&self, cipher: &[u8], out: &mut [u8]) -> Result<()> {
        self.check_len("cipher image", cipher.len(), self.cipher_len())?;
        self.check_len("output image", out.len(), self.image_len())?;
        self.decrypt_unchecked(cipher, out);
        Ok(())
    }

    /// Encrypts every image of `data` (labels are kept); the result has
    /// [`channels`](ImageCipher::channels) planes.
    pub fn encrypt_dataset(&self, data: &Dataset) -> Result<Dataset> {
        self.check_dataset(data, 1)?;
        let mut pixels = vec![0; data.len() * self.cipher_len()];
        for (input, out) in data
            .pixels()
            .chunks_exact(self.image_len())
            .zip(pixels.chunks_exact_mut(self.cipher_len()))
        {
            self.encrypt_unchecked(input, out);
        }
        data.with_planes(self.channels(), pixels)
    }

    /// Decrypts every image of `data` (labels are kept).
    pub fn decrypt_dataset(&self, data: &Dataset) -> Result<Dataset> {
        self.check_dataset(data, self.channels())?;
        let mut pixels = vec![0; data.len() * self.image_len()];
        for (input, out) in data
            .pixels()
            .chunks_exact(self.cipher_len())
            .zip(pixels.chunks_exact_mut(self.image_len()))
        {
            self.decrypt_unchecked(input, out);
        }
        data.with_planes(1, pixels)
    }

    /// log2 of the number of transforms the mode can express: `log2(nb!)`
    /// for the block shuffle; per intra-block transform (one, or `nb` with
    /// `per-block`) 3 bits for rotate/flip (`B > 1`), `log2(n!)` for the
    /// shuffle of its `n = channels * B * B` values and `n` bits for
    /// negative-positive; `rows * cols` bits for component shuffle and
    /// `channels * rows * cols` bits for pixel negative-positive.
    ///
    /// This is an upper estimate of the size of the transform family (some
    /// combinations coincide), not of the brute-force cost: the image key
    /// itself has 256 bits.
    pub fn key_space_bits(&self) -> f64 {
        let b = self.block_size;
        let n = self.channels() * b * b;
        let mut per_transform = 0.0;
        if self.steps.rotate_flip && b > 1 {
            per_transform += 3.0;
        }
        if self.steps.pixel_shuffle {
            per_transform += log2_factorial(n);
        }
        if self.steps.negative_positive {
            per_transform += n as f64;
        }
        let mut bits = per_transform * self.transforms.len() as f64;
        if self.steps.block_shuffle {
            bits += log2_factorial(self.num_blocks());
        }
        if self.steps.component_shuffle {
            bits += self.image_len() as f64;
        }
        if self.steps.pixel_negative_positive {
            bits += self.cipher_len() as f64;
        }
        bits
    }

    fn check_len(&self, what: &str, len: usize, expected: usize) -> Result<()> {
        if len == expected {
            Ok(())
        } else {
            Err(ParticipantError::Cipher(format!(
                "{what} has {len} values, expected {expected} ({} x {}x{})",
                expected / self.image_len(),
                self.rows,
                self.cols
            )))
        }
    }

    fn check_dataset(&self, data: &Dataset, channels: usize) -> Result<()> {
        if data.rows() != self.rows || data.cols() != self.cols || data.channels() != channels {
            return Err(ParticipantError::Cipher(format!(
                "dataset images are {} x {}x{}, the cipher expects {channels} x {}x{}",
                data.channels(),
                data.rows(),
                data.cols(),
                self.rows,
                self.cols
            )));
        }
        Ok(())
    }

    fn encrypt_unchecked(&self, plain: &[u8], out: &mut [u8]) {
        let map = out.iter_mut().zip(&self.source).zip(&self.xor);
        if self.steps.split {
            for ((o, &s), &x) in map {
                *o = split_value(plain, s) ^ x;
            }
        } else {
            for ((o, &s), &x) in map {
                *o = plain[s] ^ x;
            }
        }
    }

    fn decrypt_unchecked(&self, cipher: &[u8], out: &mut [u8]) {
        if self.steps.split {
            let mut values = Zeroizing::new(vec![0; self.cipher_len()]);
            for ((&c, &s), &x) in cipher.iter().zip(&self.source).zip(&self.xor) {
                values[s] = c ^ x;
            }
            merge_pixels(&values, out);
        } else {
            for ((&c, &s), &x) in cipher.iter().zip(&self.source).zip(&self.xor) {
                out[s] = c ^ x;
            }
        }
    }
}

/// Checks that images are non-empty, at most `2^31 - 1` pixels, and that
/// `block_size` divides both sides.
fn validate_geometry(block_size: usize, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(ParticipantError::Cipher(format!(
            "image size {rows}x{cols} is empty"
        )));
    }
    if rows
        .checked_mul(cols)
        .is_none_or(|n| n > (u32::MAX / 2) as usize)
    {
        return Err(ParticipantError::Cipher(format!(
            "image size {rows}x{cols} is too large (at most 2^31 - 1 pixels)"
        )));
    }
    let b = block_size;
    if b == 0 || !rows.is_multiple_of(b) || !cols.is_multiple_of(b) {
        let divisors: Vec<String> = (1..=rows.min(cols))
            .filter(|&d| rows.is_multiple_of(d) && cols.is_multiple_of(d))
            .map(|d| d.to_string())
            .collect();
        return Err(ParticipantError::Cipher(format!(
            "block size {b} does not divide the {rows}x{cols} image size; use one of {}",
            divisors.join(", ")
        )));
    }
    Ok(())
}

/// `log2(n!)` as a sum of `log2(k)`.
fn log2_factorial(n: usize) -> f64 {
    (2..=n).map(|k| (k as f64).log2()).sum()
}

/// In-block index of the plain pixel that the dihedral transform `t`
/// (mirror if `t >= 4`, then `t % 4` clockwise quarter turns) moves to
/// in-block index `dst`. Public for attacks that try every orientation of
/// a block (`greyfed`'s `lab::ciphertext_only`).
pub fn dihedral_source(t: u8, b: usize, dst: usize) -> usize {
    let (mut r, mut c) = (dst / b, dst % b);
    for _ in 0..(t % 4) {
        (r, c) = (b - 1 - c, r);
    }
    if t >= 4 {
        c = b - 1 - c;
    }
    r * b + c
}

/// The version-1 key derivation for one key and image geometry.
struct Kdf<'a> {
    key: &'a ImageKey,
    block_size: usize,
    rows: usize,
    cols: usize,
    split: bool,
}

impl Kdf<'_> {
    /// The HKDF `info` string for `purpose` at `position` (`None`: `all`).
    fn info(&self, purpose: &str, position: Option<usize>) -> String {
        let pos = position.map_or_else(|| "all".to_string(), |q| q.to_string());
        let planes = if self.split { "|C=2" } else { "" };
        format!(
            "{purpose}|B={}|{}x{}{planes}|pos={pos}",
            self.block_size, self.rows, self.cols
        )
    }

    /// The keystream for `purpose` at `position`.
    fn stream(&self, purpose: &str, position: Option<usize>) -> Result<KeyStream> {
        let mut seed = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(KDF_SALT), &self.key.0)
            .expand(self.info(purpose, position).as_bytes(), &mut seed[..])
            .map_err(|e| ParticipantError::Cipher(format!("key derivation failed: {e}")))?;
        let nonce = [0u8; 12];
        let cipher = ChaCha20::new_from_slices(&seed[..], &nonce)
            .map_err(|e| ParticipantError::Cipher(format!("key derivation failed: {e}")))?;
        Ok(KeyStream {
            cipher,
            buf: [0; 64],
            pos: 64,
        })
    }

    /// The intra-block transform for `position` (`None`: shared).
    fn block_transform(
        &self,
        steps: &CipherSteps,
        position: Option<usize>,
    ) -> Result<BlockTransform> {
        let b = self.block_size;
        let bb = b * b;
        let n = if self.split { 2 * bb } else { bb };
        let dihedral = if steps.rotate_flip && b > 1 {
            // uniform(8) < 8, so the cast is lossless.
            self.stream("rotate-flip", position)?.uniform(8) as u8
        } else {
            0
        };
        let shuffle = if steps.pixel_shuffle && n > 1 {
            self.stream("pixel-shuffle", position)?.permutation(n)
        } else {
            (0..n).collect()
        };
        let negated = if steps.negative_positive {
            self.stream("negative-positive", position)?.bits(n)
        } else {
            vec![false; n]
        };
        // Rotate/flip acts on positions within each plane, the same way in both.
        let source = shuffle
            .iter()
            .map(|&s| s / bb * bb + dihedral_source(dihedral, b, s % bb))
            .collect();
        Ok(BlockTransform {
            dihedral,
            source,
            negated,
        })
    }
}

/// A ChaCha20 keystream read byte by byte.
#[derive(ZeroizeOnDrop)]
struct KeyStream {
    #[zeroize(skip)]
    cipher: ChaCha20,
    buf: [u8; 64],
    pos: usize,
}

impl KeyStream {
    fn next_byte(&mut self) -> u8 {
        if self.pos == self.buf.len() {
            self.buf = [0; 64];
            self.cipher.apply_keystream(&mut self.buf);
            self.pos = 0;
        }
        let byte = self.buf[self.pos];
        self.pos += 1;
        byte
    }

    fn next_u32(&mut self) -> u32 {
        u32::from_le_bytes([
            self.next_byte(),
            self.next_byte(),
            self.next_byte(),
            self.next_byte(),
        ])
    }

    /// Uniform in `0..n` by rejection sampling; `n >= 1`.
    fn uniform(&mut self, n: u32) -> u32 {
        let n = n.max(1);
        let zone = (1u64 << 32) / u64::from(n) * u64::from(n);
        loop {
            let w = self.next_u32();
            if u64::from(w) < zone {
                return w % n;
            }
        }
    }

    /// Fisher–Yates permutation of `0..n`; `n <= u32::MAX`.
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            // `validate_geometry` bounds n (so i + 1) by u32::MAX.
            let j = self.uniform(u32::try_from(i + 1).unwrap_or(u32::MAX)) as usize;
            p.swap(i, j);
        }
        p
    }

    fn bits(&mut self, n: usize) -> Vec<bool> {
        (0..n).map(|_| self.next_byte() & 1 == 1).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The key `00 01 .. 1f` used by the known-answer tests.
    fn kat_key() -> ImageKey {
        let mut bytes = [0u8; KEY_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        ImageKey::from_bytes(bytes)
    }

    fn key_from_seed(seed: u8) -> ImageKey {
        let mut bytes = [0x5a; KEY_LEN];
        bytes[0] = seed;
        bytes[31] = seed.wrapping_mul(37);
        ImageKey::from_bytes(bytes)
    }

    /// Deterministic pseudo-random pixels (splitmix-style, test data only).
    fn noise_image(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (0..len)
            .map(|_| {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z >> 56) as u8
            })
            .collect()
    }

    /// A smooth, digit-like 28x28 image: dark background, a bright ring.
    fn digit_like_image() -> Vec<u8> {
        let mut img = vec![0u8; 28 * 28];
        for r in 0..28 {
            for c in 0..28 {
                let (dr, dc) = (r as f64 - 13.5, c as f64 - 13.5);
                let d = (dr * dr / 100.0 + dc * dc / 49.0).sqrt();
                let v = 255.0 * (-((d - 1.0) * (d - 1.0)) * 12.0).exp();
                img[r * 28 + c] = v.round() as u8;
            }
        }
        img
    }

    /// The block-wise steps in bits 0-3 of `flags`, with `per_block` keying
    /// when at least one intra-block step is on.
    fn config(per_block: bool, flags: u8) -> CipherSteps {
        CipherSteps {
            block_shuffle: flags & 1 != 0,
            rotate_flip: flags & 2 != 0,
            negative_positive: flags & 4 != 0,
            pixel_shuffle: flags & 8 != 0,
            per_block: per_block && flags & 14 != 0,
            ..CipherSteps::default()
        }
    }

    const SHARED: bool = false;
    const PER_BLOCK: bool = true;

    fn extended() -> CipherSteps {
        "extended".parse().unwrap()
    }

    fn encrypt(s: &ImageCipher, plain: &[u8]) -> Vec<u8> {
        let mut out = vec![0; s.cipher_len()];
        s.encrypt_image(plain, &mut out).unwrap();
        out
    }

    fn decrypt(s: &ImageCipher, cipher: &[u8]) -> Vec<u8> {
        let mut out = vec![0; s.image_len()];
        s.decrypt_image(cipher, &mut out).unwrap();
        out
    }

    fn is_permutation(p: &[usize]) -> bool {
        let mut seen = vec![false; p.len()];
        p.iter()
            .all(|&i| i < seen.len() && !std::mem::replace(&mut seen[i], true))
    }

    fn correlation(a: &[u8], b: &[u8]) -> f64 {
        let n = a.len() as f64;
        let ma = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let mb = b.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
        for (&x, &y) in a.iter().zip(b) {
            let (dx, dy) = (f64::from(x) - ma, f64::from(y) - mb);
            sab += dx * dy;
            saa += dx * dx;
            sbb += dy * dy;
        }
        sab / (saa * sbb).sqrt()
    }

    const SIZES: &[(usize, usize, usize)] = &[
        (28, 28, 1),
        (28, 28, 2),
        (28, 28, 4),
        (28, 28, 7),
        (28, 28, 14),
        (28, 28, 28),
        (8, 12, 4),
        (8, 12, 2),
        (3, 5, 1),
    ];

    #[test]
    fn round_trip_every_size_keying_and_step_subset() {
        let key = kat_key();
        for &(rows, cols, b) in SIZES {
            let plain = noise_image(rows * cols, (rows * 100 + cols * 10 + b) as u64);
            for keying in [SHARED, PER_BLOCK] {
                for flags in 0..16 {
                    let s = ImageCipher::new(&key, config(keying, flags), b, rows, cols).unwrap();
                    assert!(is_permutation(s.value_source()));
                    assert!(is_permutation(s.block_permutation()));
                    let c = encrypt(&s, &plain);
                    assert_eq!(
                        decrypt(&s, &c),
                        plain,
                        "{rows}x{cols} B={b} {keying:?} {flags}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn prop_round_trip(
            key in any::<[u8; KEY_LEN]>(),
            (rows, cols, b, plain) in prop::sample::select(SIZES).prop_flat_map(|(r, c, b)| {
                (Just(r), Just(c), Just(b), prop::collection::vec(any::<u8>(), r * c))
            }),
            per_position in any::<bool>(),
            flags in 0u8..16,
        ) {
            let keying = if per_position { PER_BLOCK } else { SHARED };
            let s = ImageCipher::new(&ImageKey::from_bytes(key), config(keying, flags), b, rows, cols)
                .unwrap();
            let c = encrypt(&s, &plain);
            prop_assert_eq!(decrypt(&s, &c), plain.clone());
            // Encryption is exactly "permute, then XOR with 0x00/0xFF".
            for d in 0..plain.len() {
                prop_assert_eq!(c[d], plain[s.value_source()[d]] ^ s.value_xor()[d]);
                prop_assert!(s.value_xor()[d] == 0 || s.value_xor()[d] == 0xFF);
            }
        }
    }

    #[test]
    fn block_size_must_divide_image_size() {
        let key = kat_key();
        let err = ImageCipher::new(&key, CipherSteps::block(), 5, 28, 28)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("block size 5 does not divide the 28x28"),
            "{err}"
        );
        assert!(err.contains("use one of 1, 2, 4, 7, 14, 28"), "{err}");

        let err = validate_geometry(3, 8, 12).unwrap_err().to_string();
        assert!(err.contains("use one of 1, 2, 4"), "{err}");

        let err = validate_geometry(0, 28, 28).unwrap_err().to_string();
        assert!(err.contains("block size 0"), "{err}");

        assert!(validate_geometry(1, 0, 28).is_err());
        assert!(validate_geometry(1, usize::MAX, 2).is_err());
    }

    #[test]
    fn wrong_lengths_are_errors_not_panics() {
        let s = ImageCipher::new(&kat_key(), CipherSteps::block(), 4, 28, 28).unwrap();
        let mut out = vec![0; 784];
        let err = s
            .encrypt_image(&[0; 783], &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("783") && err.contains("28x28"), "{err}");
        assert!(s.decrypt_image(&[0; 784], &mut out[..10]).is_err());

        let other = Dataset::new(8, 12, 10, vec![0; 96], vec![1]).unwrap();
        let err = s.encrypt_dataset(&other).unwrap_err().to_string();
        assert!(err.contains("8x12"), "{err}");
        assert!(s.decrypt_dataset(&other).is_err());
    }

    #[test]
    fn dataset_round_trip_keeps_labels() {
        let s = ImageCipher::new(&kat_key(), extended(), 7, 28, 28).unwrap();
        let data = Dataset::new(28, 28, 10, noise_image(3 * 784, 7), vec![3, 1, 4]).unwrap();
        let enc = s.encrypt_dataset(&data).unwrap();
        assert_eq!(enc.labels(), data.labels());
        assert_ne!(enc.pixels(), data.pixels());
        for i in 0..3 {
            assert_eq!(enc.image(i), encrypt(&s, data.image(i)).as_slice());
        }
        assert_eq!(s.decrypt_dataset(&enc).unwrap(), data);
    }

    #[test]
    fn deterministic_and_key_sensitive() {
        let config = CipherSteps::block();
        let key = kat_key();
        let mut flipped = kat_key().0;
        flipped[17] ^= 0x08;
        let flipped = ImageKey::from_bytes(flipped);

        let a = ImageCipher::new(&key, config, 4, 28, 28).unwrap();
        let a2 = ImageCipher::new(&key, config, 4, 28, 28).unwrap();
        let b = ImageCipher::new(&flipped, config, 4, 28, 28).unwrap();
        assert_eq!(a.value_source(), a2.value_source());
        assert_eq!(a.value_xor(), a2.value_xor());
        assert_eq!(a.key_fingerprint(), key.fingerprint());
        assert_ne!(a.key_fingerprint(), b.key_fingerprint());
        assert_ne!(a.block_permutation(), b.block_permutation());

        for plain in [noise_image(784, 1), digit_like_image()] {
            let (ca, ca2, cb) = (
                encrypt(&a, &plain),
                encrypt(&a2, &plain),
                encrypt(&b, &plain),
            );
            assert_eq!(ca, ca2);
            let differing = ca.iter().zip(&cb).filter(|(x, y)| x != y).count();
            assert!(differing > 784 / 2, "only {differing} of 784 pixels differ");
        }
    }

    #[test]
    fn shared_keying_is_block_permutation_plus_one_in_block_map() {
        let (rows, cols, b) = (28, 28, 4);
        for seed in 0..5 {
            let s = ImageCipher::new(&key_from_seed(seed), CipherSteps::block(), b, rows, cols)
                .unwrap();
            let per_row = cols / b;
            let mut first_map: Option<(Vec<usize>, Vec<u8>)> = None;
            let mut src_blocks = Vec::new();
            for q in 0..s.num_blocks() {
                let (q_row, q_col) = (q / per_row * b, q % per_row * b);
                let mut blocks = Vec::new();
                let mut offsets = Vec::new();
                let mut xors = Vec::new();
                for d in 0..b * b {
                    let dst = (q_row + d / b) * cols + q_col + d % b;
                    let src = s.value_source()[dst];
                    let (r, c) = (src / cols, src % cols);
                    blocks.push(r / b * per_row + c / b);
                    offsets.push(r % b * b + c % b);
                    xors.push(s.value_xor()[dst]);
                }
                // Every cipher block comes from exactly one plain block ...
                assert!(blocks.iter().all(|&p| p == blocks[0]));
                assert_eq!(blocks[0], s.block_permutation()[q]);
                src_blocks.push(blocks[0]);
                // ... through the same in-block map and mask.
                let t = s.intra_block_transform(q).unwrap();
                assert_eq!(offsets, t.source());
                let mask: Vec<u8> = t
                    .negated()
                    .iter()
                    .map(|&n| if n { 0xFF } else { 0 })
                    .collect();
                assert_eq!(xors, mask);
                match &first_map {
                    None => first_map = Some((offsets, xors)),
                    Some(first) => assert_eq!(first, &(offsets, xors)),
                }
            }
            assert!(is_permutation(&src_blocks));
            assert!(s.intra_block_transform(s.num_blocks()).is_none());
        }
    }

    #[test]
    fn per_position_keying_varies_between_blocks() {
        let s = ImageCipher::new(&kat_key(), extended(), 4, 28, 28).unwrap();
        let distinct: std::collections::HashSet<Vec<usize>> = (0..s.num_blocks())
            .map(|q| s.intra_block_transform(q).unwrap().source().to_vec())
            .collect();
        assert!(distinct.len() > 40, "{} distinct maps", distinct.len());
        // Block permutation does not depend on the keying.
        let shared = ImageCipher::new(&kat_key(), CipherSteps::block(), 4, 28, 28).unwrap();
        assert_eq!(s.block_permutation(), shared.block_permutation());
    }

    #[test]
    fn negative_positive_flips_about_half() {
        let config = config(SHARED, 4);
        let mut flipped = 0;
        for seed in 0..100 {
            let s = ImageCipher::new(&key_from_seed(seed), config, 4, 28, 28).unwrap();
            let count = s
                .intra_block_transform(0)
                .unwrap()
                .negated()
                .iter()
                .filter(|&&n| n)
                .count();
            assert!(count < 16, "all 16 positions flipped");
            flipped += count;
        }
        let fraction = flipped as f64 / 1600.0;
        assert!((0.4..0.6).contains(&fraction), "fraction {fraction}");
    }

    #[test]
    fn disabled_steps_are_identity_and_steps_are_independent() {
        let key = kat_key();
        for keying in [SHARED, PER_BLOCK] {
            let s = ImageCipher::new(&key, config(keying, 0), 4, 28, 28).unwrap();
            let plain = noise_image(784, 3);
            assert_eq!(encrypt(&s, &plain), plain);
            assert_eq!(s.key_space_bits(), 0.0);
        }
        let all = ImageCipher::new(&key, config(SHARED, 15), 4, 28, 28).unwrap();
        for flags in 0..16u8 {
            let s = ImageCipher::new(&key, config(SHARED, flags), 4, 28, 28).unwrap();
            if flags & 1 != 0 {
                assert_eq!(s.block_permutation(), all.block_permutation());
            }
            let (t, t_all) = (
                s.intra_block_transform(0).unwrap(),
                all.intra_block_transform(0).unwrap(),
            );
            if flags & 2 != 0 {
                assert_eq!(t.dihedral(), t_all.dihedral());
            }
            if flags & 4 != 0 {
                assert_eq!(t.negated(), t_all.negated());
            }
            if flags & 10 == 10 {
                assert_eq!(t.source(), t_all.source());
            }
        }
    }

    #[test]
    fn dihedral_transforms() {
        // Clockwise quarter turn of [[a, b], [c, d]] is [[c, a], [d, b]].
        let turned: Vec<usize> = (0..4).map(|d| dihedral_source(1, 2, d)).collect();
        assert_eq!(turned, [2, 0, 3, 1]);
        // Mirror: [[b, a], [d, c]].
        let mirrored: Vec<usize> = (0..4).map(|d| dihedral_source(4, 2, d)).collect();
        assert_eq!(mirrored, [1, 0, 3, 2]);
        for b in [2, 3, 4] {
            let maps: std::collections::HashSet<Vec<usize>> = (0..8)
                .map(|t| (0..b * b).map(|d| dihedral_source(t, b, d)).collect())
                .collect();
            assert_eq!(maps.len(), 8);
            assert!(maps.iter().all(|m| is_permutation(m)));
        }
    }

    #[test]
    fn encrypted_image_is_unlike_the_plain_image() {
        let plain = digit_like_image();
        for seed in 0..10 {
            for config in [CipherSteps::block(), extended()] {
                let s = ImageCipher::new(&key_from_seed(seed), config, 4, 28, 28).unwrap();
                let c = encrypt(&s, &plain);
                assert_ne!(c, plain);
                let same = c.iter().zip(&plain).filter(|(x, y)| x == y).count();
                assert!(same < 784 / 4, "{same} pixels unchanged");
                let rho = correlation(&plain, &c);
                assert!(rho.abs() < 0.25, "correlation {rho}");
            }
        }
    }

    #[test]
    fn key_space_estimate() {
        let s = ImageCipher::new(&kat_key(), CipherSteps::block(), 4, 28, 28).unwrap();
        // log2(49!) + 3 + log2(16!) + 16, values from an independent computation.
        let expected = 208.564_281_873_815_45 + 3.0 + 44.250_140_469_882_616 + 16.0;
        assert!((s.key_space_bits() - expected).abs() < 1e-6);
        let e = ImageCipher::new(&kat_key(), extended(), 4, 28, 28).unwrap();
        let expected = 208.564_281_873_815_45 + 49.0 * (3.0 + 44.250_140_469_882_616 + 16.0);
        assert!((e.key_space_bits() - expected).abs() < 1e-6);
        let one = ImageCipher::new(&kat_key(), CipherSteps::block(), 1, 3, 5).unwrap();
        // B = 1: no rotation, no shuffle inside a pixel, one NP bit.
        assert!((one.key_space_bits() - (log2_factorial(15) + 1.0)).abs() < 1e-9);
    }

    /// Known-answer test pinning the version-1 specification. The expected
    /// values come from an independent Python implementation of the spec
    /// (HKDF and ChaCha20 from the `cryptography` package).
    #[test]
    fn known_answers() {
        let key = kat_key();
        assert_eq!(key.fingerprint(), "dadac72c6b3138e7");

        let s = ImageCipher::new(&key, CipherSteps::block(), 4, 28, 28).unwrap();
        assert_eq!(s.block_permutation()[..8], [36, 10, 21, 20, 14, 45, 38, 27]);
        let t = s.intra_block_transform(0).unwrap();
        assert_eq!(t.dihedral(), 4);
        assert_eq!(
            t.source(),
            [3, 7, 1, 12, 15, 4, 10, 6, 5, 2, 14, 0, 8, 11, 13, 9]
        );
        let mask: Vec<u8> = t.negated().iter().map(|&n| u8::from(n)).collect();
        assert_eq!(mask, [1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1]);
        assert_eq!(
            s.value_source()[..16],
            [
                567, 595, 565, 648, 127, 155, 125, 208, 339, 367, 337, 420, 251, 279, 249, 332
            ]
        );
        assert_eq!(
            s.value_xor()[..16],
            [255, 0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0]
        );
        let mut hasher = Sha256::new();
        for &src in s.value_source() {
            hasher.update((src as u32).to_le_bytes());
        }
        hasher.update(s.value_xor());
        assert_eq!(
            hex::encode(hasher.finalize()),
            "277857d38861438926ce40554d34e2ac331f1ec5a5cc63c61a70cca3f6afd1b3"
        );
        let ramp: Vec<u8> = (0..784).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(
            encrypt(&s, &ramp)[..16],
            [
                126, 69, 115, 184, 134, 61, 107, 176, 186, 9, 55, 124, 34, 161, 207, 20
            ]
        );

        let pp = ImageCipher::new(&key, extended(), 4, 28, 28).unwrap();
        assert_eq!(
            pp.value_source()[..16],
            [
                621, 593, 651, 623, 182, 209, 155, 152, 337, 392, 422, 367, 279, 251, 305, 307
            ]
        );
        assert_eq!(
            pp.value_xor()[..16],
            [
                0, 0, 255, 255, 255, 255, 0, 255, 255, 0, 255, 255, 255, 255, 255, 255
            ]
        );

        let small = ImageCipher::new(&key, CipherSteps::block(), 4, 8, 12).unwrap();
        assert_eq!(small.block_permutation(), [4, 0, 3, 5, 1, 2]);
        assert_eq!(
            small.value_source()[..12],
            [66, 54, 90, 53, 14, 2, 38, 1, 62, 50, 86, 49]
        );
    }

    /// Recomputes the block permutation straight from the `hkdf` and
    /// `chacha20` crates, bypassing `Kdf` and `KeyStream`.
    #[test]
    fn block_permutation_matches_direct_kdf() {
        let key = kat_key();
        let hk = Hkdf::<Sha256>::new(Some(b"greyfed/image-cipher/v1"), &key.0);
        let mut seed = [0u8; 32];
        hk.expand(b"block-permutation|B=4|28x28|pos=all", &mut seed)
            .unwrap();
        let mut stream = vec![0u8; 4096];
        ChaCha20::new(&seed.into(), &[0u8; 12].into()).apply_keystream(&mut stream);
        let mut words = stream
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()));
        let mut p: Vec<usize> = (0..49).collect();
        for i in (1..49usize).rev() {
            let n = (i + 1) as u64;
            let j = loop {
                let w = u64::from(words.next().unwrap());
                if w < (1u64 << 32) / n * n {
                    break (w % n) as usize;
                }
            };
            p.swap(i, j);
        }
        let s = ImageCipher::new(&key, CipherSteps::block(), 4, 28, 28).unwrap();
        assert_eq!(s.block_permutation(), p);
    }

    /// Every combination of steps (block-wise, split, pixel-based, keying)
    /// decrypts exactly and is "permute, then XOR 0x00/0xFF" on values.
    #[test]
    fn round_trip_every_combination_of_all_steps() {
        let key = kat_key();
        for &(rows, cols, b) in &[(28, 28, 4), (8, 12, 2), (3, 5, 1)] {
            let plain = noise_image(rows * cols, (rows + cols + b) as u64);
            for bits in 0u16..256 {
                let steps = CipherSteps {
                    block_shuffle: bits & 1 != 0,
                    rotate_flip: bits & 2 != 0,
                    negative_positive: bits & 4 != 0,
                    pixel_shuffle: bits & 8 != 0,
                    split: bits & 16 != 0,
                    pixel_negative_positive: bits & 32 != 0,
                    component_shuffle: bits & 64 != 0,
                    per_block: bits & 128 != 0,
                };
                let Ok(s) = ImageCipher::new(&key, steps, b, rows, cols) else {
                    assert!(steps.validate().is_err(), "{steps}");
                    continue;
                };
                assert_eq!(s.channels(), if steps.split { 2 } else { 1 });
                assert!(is_permutation(s.value_source()), "{steps}");
                let c = encrypt(&s, &plain);
                assert_eq!(c.len(), s.channels() * rows * cols);
                assert_eq!(decrypt(&s, &c), plain, "{steps} {rows}x{cols} B={b}");
                let mut values = vec![0; c.len()];
                if steps.split {
                    split_pixels(&plain, &mut values);
                } else {
                    values.copy_from_slice(&plain);
                }
                for d in 0..c.len() {
                    assert_eq!(c[d], values[s.value_source()[d]] ^ s.value_xor()[d]);
                }
            }
        }
    }

    #[test]
    fn split_halves_round_trip_and_invert_with_xor() {
        let plain: Vec<u8> = (0..=255).collect();
        let mut values = vec![0; 512];
        split_pixels(&plain, &mut values);
        assert_eq!(values[0x3a], 3 * 17);
        assert_eq!(values[256 + 0x3a], 10 * 17);
        let mut back = vec![0; 256];
        merge_pixels(&values, &mut back);
        assert_eq!(back, plain);
        // Inverting a half (h -> 15 - h) is XOR 0xFF of its value.
        for h in 0..16u8 {
            assert_eq!((h * 17) ^ 0xFF, (15 - h) * 17);
        }
    }

    /// Tanaka's learnable encryption: one shuffle and mask of the 2*B*B
    /// half-values, the same in every block, blocks in place.
    #[test]
    fn learnable_encryption_mixes_both_halves_inside_blocks() {
        let le: CipherSteps = "le".parse().unwrap();
        let s = ImageCipher::new(&kat_key(), le, 4, 28, 28).unwrap();
        let t = s.intra_block_transform(0).unwrap();
        assert_eq!(t.source().len(), 32);
        assert!(is_permutation(t.source()));
        // Some high-half values move to the low plane and back.
        assert!(t.source()[..16].iter().any(|&v| v >= 16));
        assert!(t.source()[16..].iter().any(|&v| v < 16));
        assert_eq!(s.block_permutation(), (0..49).collect::<Vec<_>>());
        assert!(std::ptr::eq(t, s.intra_block_transform(48).unwrap()));
        // log2((2*16)!) + 32 bits per key.
        assert!((s.key_space_bits() - (log2_factorial(32) + 32.0)).abs() < 1e-9);
        // Different for a different purpose: no shared stream with `block`.
        let block = ImageCipher::new(&kat_key(), CipherSteps::block(), 4, 28, 28).unwrap();
        let block_mask = block.intra_block_transform(0).unwrap().negated();
        assert_ne!(&t.negated()[..16], block_mask);
    }

    /// Pixel-based encryption keeps every pixel in place: the two halves of
    /// a pixel are swapped or not, and each value is inverted with its own
    /// key bit, straight from the specification's streams.
    #[test]
    fn pixel_based_encryption_matches_the_specification() {
        let key = kat_key();
        let stream_bits = |info: &str, n: usize| -> Vec<bool> {
            let hk = Hkdf::<Sha256>::new(Some(b"greyfed/image-cipher/v1"), &key.0);
            let mut seed = [0u8; 32];
            hk.expand(info.as_bytes(), &mut seed).unwrap();
            let mut stream = vec![0u8; n];
            ChaCha20::new(&seed.into(), &[0u8; 12].into()).apply_keystream(&mut stream);
            stream.iter().map(|b| b & 1 == 1).collect()
        };
        let swap = stream_bits("component-shuffle|B=4|28x28|C=2|pos=all", 784);
        let flip = stream_bits("pixel-negative-positive|B=4|28x28|C=2|pos=all", 1568);
        let pixel: CipherSteps = "pixel".parse().unwrap();
        let s = ImageCipher::new(&key, pixel, 4, 28, 28).unwrap();
        let plain = digit_like_image();
        let c = encrypt(&s, &plain);
        for i in 0..784 {
            let (hi, lo) = ((plain[i] >> 4) * 17, (plain[i] & 15) * 17);
            let (a, b) = if swap[i] { (lo, hi) } else { (hi, lo) };
            let x = |f: bool| if f { 0xFF } else { 0 };
            assert_eq!((c[i], c[784 + i]), (a ^ x(flip[i]), b ^ x(flip[784 + i])));
        }
        let swapped = swap.iter().filter(|&&b| b).count();
        assert!((300..500).contains(&swapped), "{swapped}");

        // Without split: one bit per pixel.
        let np: CipherSteps = "pixel-negpos".parse().unwrap();
        let s = ImageCipher::new(&key, np, 4, 28, 28).unwrap();
        let flip = stream_bits("pixel-negative-positive|B=4|28x28|pos=all", 784);
        let c = encrypt(&s, &plain);
        for i in 0..784 {
            assert_eq!(c[i], if flip[i] { 255 - plain[i] } else { plain[i] });
        }
        assert_eq!(s.key_space_bits(), 784.0);
    }

    #[test]
    fn spec_names_the_mode_and_checks_the_key() {
        let key = kat_key();
        let s = ImageCipher::new(&key, "le".parse().unwrap(), 4, 28, 28).unwrap();
        let spec = s.spec();
        assert_eq!(
            spec.to_string(),
            format!("le B=4 key={}", key.fingerprint())
        );
        let again = ImageCipher::from_spec(&key, &spec, 28, 28).unwrap();
        assert_eq!(again.value_source(), s.value_source());
        let err = ImageCipher::from_spec(&key_from_seed(9), &spec, 28, 28).unwrap_err();
        assert!(err.to_string().contains(&key.fingerprint()), "{err}");
        assert!(!err.to_string().contains(&key.expose_secret_hex()));
        // A split dataset has two planes and decrypts back to one.
        let data = Dataset::new(28, 28, 10, noise_image(2 * 784, 5), vec![1, 2]).unwrap();
        let enc = s.encrypt_dataset(&data).unwrap();
        assert_eq!((enc.channels(), enc.image_len()), (2, 1568));
        assert_eq!(s.decrypt_dataset(&enc).unwrap(), data);
        assert!(s.encrypt_dataset(&enc).is_err());
        assert!(s.decrypt_dataset(&data).is_err());
    }

    #[test]
    fn key_formatting_hides_the_key() {
        let key = kat_key();
        let secret = key.expose_secret_hex();
        assert_eq!(secret.len(), 64);
        assert_eq!(&secret[..8], "00010203");
        let fp = key.fingerprint();
        assert_eq!(fp.len(), 16);
        for shown in [format!("{key:?}"), format!("{key}"), format!("{key:#?}")] {
            assert!(!shown.contains(&secret), "{shown}");
            assert!(!shown.contains("000102030405"), "{shown}");
            assert!(shown.contains(&fp), "{shown}");
        }
        let s = ImageCipher::new(&key, CipherSteps::block(), 4, 28, 28).unwrap();
        assert!(!format!("{s:?}").contains(&secret));
    }

    #[test]
    fn generated_keys_differ() {
        let (a, b) = (ImageKey::generate(), ImageKey::generate());
        assert_ne!(a.expose_secret_hex(), b.expose_secret_hex());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn key_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.key");
        let key = ImageKey::generate();
        key.write_file(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", key.expose_secret_hex()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let read = ImageKey::read_file(&path).unwrap();
        assert_eq!(read.expose_secret_hex(), key.expose_secret_hex());

        // Never overwrites.
        let err = ImageKey::generate()
            .write_file(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(
            ImageKey::read_file(&path).unwrap().expose_secret_hex(),
            key.expose_secret_hex()
        );
    }

    /// Writes `contents` to a new owner-only file in `dir`.
    fn private_file(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        path
    }

    #[test]
    fn key_file_accepts_case_and_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let hex_upper = kat_key().expose_secret_hex().to_uppercase();
        let path = private_file(dir.path(), "k", &format!("  {hex_upper}\r\n\n"));
        let key = ImageKey::read_file(&path).unwrap();
        assert_eq!(key.fingerprint(), kat_key().fingerprint());
    }

    #[test]
    fn key_file_errors_are_clear_and_never_quote_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let known = "0123456789abcdef".repeat(4);

        let err = ImageKey::read_file(dir.path().join("missing.key")).unwrap_err();
        assert!(matches!(err, ParticipantError::KeyFile { .. }), "{err:?}");
        assert!(err.to_string().contains("not found"), "{err}");

        let short = private_file(dir.path(), "short", &format!("{}\n", &known[..63]));
        let err = ImageKey::read_file(&short).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ParticipantError::KeyFile { .. }), "{err:?}");
        assert!(
            msg.contains("expected 64 hex characters (32 bytes), found 63"),
            "{msg}"
        );
        assert!(!msg.contains(&known[..16]) && !format!("{err:?}").contains(&known[..16]));

        let long = private_file(dir.path(), "long", &format!("{known}00"));
        let msg = ImageKey::read_file(&long).unwrap_err().to_string();
        assert!(
            msg.contains("found 66") && !msg.contains(&known[..16]),
            "{msg}"
        );

        let bad = format!("{}zz{}", &known[..30], &known[32..]);
        let non_hex = private_file(dir.path(), "nonhex", &bad);
        let msg = ImageKey::read_file(&non_hex).unwrap_err().to_string();
        assert!(msg.contains("character 31 is not a hex digit"), "{msg}");
        assert!(!msg.contains(&known[..16]), "{msg}");

        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xffu8, 0xfe, 0x00]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(
            ImageKey::read_file(&binary)
                .unwrap_err()
                .to_string()
                .contains("not text")
        );

        let huge = private_file(dir.path(), "huge", &"a".repeat(5000));
        let msg = ImageKey::read_file(&huge).unwrap_err().to_string();
        assert!(msg.contains("5000 bytes"), "{msg}");

        let err = ImageKey::read_file(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = private_file(dir.path(), "open.key", &kat_key().expose_secret_hex());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ImageKey::read_file(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ParticipantError::KeyFile { .. }), "{err:?}");
        assert!(msg.contains("chmod 600") && msg.contains("0644"), "{msg}");
        assert!(!msg.contains(&kat_key().expose_secret_hex()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(ImageKey::read_file(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(ImageKey::read_file(&path).is_ok());
    }
}
