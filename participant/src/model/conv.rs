//! Building blocks of the hand-written convolution passes (the CNN's and
//! the grid CNN's): buffers reused between minibatches, 3x3 im2col and its
//! adjoint on channels-last activations, kernel re-layout between PyTorch's
//! `(c, ky, kx)` and im2col's `(ky, kx, c)` column order, and column sums.

use super::gemm::{MatRef, dot, gram};
use crate::error::Result;

/// `v` holding exactly `len` values (old contents unspecified).
pub(crate) fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    // Only grows: shrinking and growing again would zero the regrown part.
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// `v` holding exactly `len` codes (old contents unspecified).
pub(crate) fn sized_u32(v: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if v.len() < len {
        v.resize(len, 0);
    }
    &mut v[..len]
}
/// Kernel `[O, C, 3, 3]` (PyTorch) to `[O, 3, 3, C]` (im2col column order).
pub(crate) fn to_internal(w: &[f32], o: usize, c: usize, out: &mut [f32]) {
    for oi in 0..o {
        for ci in 0..c {
            for k in 0..9 {
                out[(oi * 9 + k) * c + ci] = w[(oi * c + ci) * 9 + k];
            }
        }
    }
}

/// Inverse of [`to_internal`].
pub(crate) fn from_internal(w: &[f32], o: usize, c: usize, out: &mut [f32]) {
    for oi in 0..o {
        for ci in 0..c {
            for k in 0..9 {
                out[(oi * c + ci) * 9 + k] = w[(oi * 9 + k) * c + ci];
            }
        }
    }
}
/// Calls `$f::<C>(args)` with `C` the channel count `$c` as a constant for
/// the common counts (so that the per-pixel runs of `C` values compile to
/// fixed-size vector code), `C = 0` (the count read at run time) otherwise.
macro_rules! by_channels {
    ($c:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $c {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            16 => $f::<16>($($arg),*),
            32 => $f::<32>($($arg),*),
            64 => $f::<64>($($arg),*),
            _ => $f::<0>($($arg),*),
        }
    };
}
pub(crate) use by_channels;

/// im2col of channels-last `x [n, h, w, c]` for a 3x3 convolution with
/// padding 1: `cols [n * h * w, 9 * c]`, columns `(ky, kx, c)`.
pub(crate) fn im2col(x: &[f32], n: usize, h: usize, w: usize, c: usize, cols: &mut [f32]) {
    by_channels!(c, im2col_c(x, n, h, w, c, cols));
}

/// [`im2col`] for `C` channels (`C = 0`: `c`).
#[inline(always)]
fn im2col_c<const C: usize>(x: &[f32], n: usize, h: usize, w: usize, c: usize, cols: &mut [f32]) {
    let c = if C == 0 { c } else { C };
    // One kernel row (ky) of a patch: three pixels.
    let run = 3 * c;
    let images = x
        .chunks_exact(h * w * c)
        .zip(cols.chunks_exact_mut(h * w * 9 * c));
    for (img, out) in images.take(n) {
        for (y, out) in out.chunks_exact_mut(w * 9 * c).enumerate() {
            for ky in 0..3 {
                let sy = (y + ky).wrapping_sub(1);
                let src = (sy < h).then(|| &img[sy * w * c..(sy + 1) * w * c]);
                for (xx, row) in out.chunks_exact_mut(9 * c).enumerate() {
                    let dst = &mut row[ky * run..(ky + 1) * run];
                    match src {
                        None => dst.fill(0.0),
                        Some(src) if xx >= 1 && xx + 1 < w => {
                            dst.copy_from_slice(&src[(xx - 1) * c..(xx + 2) * c]);
                        }
                        Some(src) => {
                            for (kx, dst) in dst.chunks_exact_mut(c).enumerate() {
                                let sx = (xx + kx).wrapping_sub(1);
                                if sx < w {
                                    dst.copy_from_slice(&src[sx * c..(sx + 1) * c]);
                                } else {
                                    dst.fill(0.0);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One image's gradient norm `|du^T im2col(x)|^2` (Frobenius) of a 3x3
/// convolution with padding 1 on an `h x w` grid, from its output gradient
/// `du [h*w, c_out]` and input `x [h*w, c_in]`, without the gradient or the
/// im2col (a ghost norm): the im2col's Gram matrix is the sum, over the
/// nine kernel offsets, of the input's Gram matrix shifted by the offset
/// where both cells stay inside, so the cost is `(h w)^2 (c_in + c_out)`
/// rather than `h w 9 c_in c_out`.
pub(crate) fn conv3x3_grad_norm_sq(
    du: MatRef<'_>,
    x: MatRef<'_>,
    (h, w): (usize, usize),
    scratch: &mut Vec<f32>,
) -> Result<f64> {
    let t = h * w;
    let buf = sized(scratch, 3 * t * t);
    let (g_du, rest) = buf.split_at_mut(t * t);
    let (g_x, g_cols) = rest.split_at_mut(t * t);
    gram(du, g_du)?;
    gram(x, g_x)?;
    g_cols.fill(0.0);
    // Offset d - 1 along an axis of length len: the cells v whose v + d - 1
    // is inside too.
    let inside = |d: usize, len: usize| (1 - d.min(1))..(len + 1 - d).min(len);
    for (dy, dx) in (0..3).flat_map(|dy| (0..3).map(move |dx| (dy, dx))) {
        let (ys, xs) = (inside(dy, h), inside(dx, w));
        let run = xs.len();
        for ty in ys.clone() {
            for tx in xs.clone() {
                let (row, src) = (ty * w + tx, (ty + dy - 1) * w + tx + dx - 1);
                for sy in ys.clone() {
                    let out = &mut g_cols[row * t + sy * w + xs.start..][..run];
                    let from = &g_x[src * t + (sy + dy - 1) * w + xs.start + dx - 1..][..run];
                    for (o, v) in out.iter_mut().zip(from) {
                        *o += v;
                    }
                }
            }
        }
    }
    Ok(dot(g_du, g_cols))
}

/// Adjoint of [`im2col`]: sums the gradient `cols [n * h * w, 9 * c]` back
/// onto the pixels, `dx [n, h, w, c]`.
pub(crate) fn col2im(cols: &[f32], n: usize, h: usize, w: usize, c: usize, dx: &mut [f32]) {
    by_channels!(c, col2im_c(cols, n, h, w, c, dx));
}

/// [`col2im`] for `C` channels (`C = 0`: `c`).
#[inline(always)]
fn col2im_c<const C: usize>(cols: &[f32], n: usize, h: usize, w: usize, c: usize, dx: &mut [f32]) {
    let c = if C == 0 { c } else { C };
    let run = 3 * c;
    dx.fill(0.0);
    let add = |dst: &mut [f32], src: &[f32]| {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    };
    let images = dx
        .chunks_exact_mut(h * w * c)
        .zip(cols.chunks_exact(h * w * 9 * c));
    for (img, cols) in images.take(n) {
        for (y, cols) in cols.chunks_exact(w * 9 * c).enumerate() {
            for ky in 0..3 {
                let sy = (y + ky).wrapping_sub(1);
                if sy >= h {
                    continue;
                }
                let dst = &mut img[sy * w * c..(sy + 1) * w * c];
                for (xx, row) in cols.chunks_exact(9 * c).enumerate() {
                    let src = &row[ky * run..(ky + 1) * run];
                    if xx >= 1 && xx + 1 < w {
                        add(&mut dst[(xx - 1) * c..(xx + 2) * c], src);
                    } else {
                        for (kx, src) in src.chunks_exact(c).enumerate() {
                            let sx = (xx + kx).wrapping_sub(1);
                            if sx < w {
                                add(&mut dst[sx * c..(sx + 1) * c], src);
                            }
                        }
                    }
                }
            }
        }
    }
}
/// Sums over the rows of `x [M, c]` into `out [c]`.
pub(crate) fn column_sums(x: &[f32], c: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in x.chunks_exact(c) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_relayout_round_trips() {
        let w: Vec<f32> = (0..4 * 3 * 9).map(|v| v as f32).collect();
        let mut internal = vec![0f32; w.len()];
        to_internal(&w, 4, 3, &mut internal);
        // Output 1, input channel 2, (ky, kx) = (0, 1): PyTorch index
        // (1 * 3 + 2) * 9 + 1, internal (1 * 9 + 1) * 3 + 2.
        assert_eq!(internal[(9 + 1) * 3 + 2], w[(3 + 2) * 9 + 1]);
        let mut back = vec![0f32; w.len()];
        from_internal(&internal, 4, 3, &mut back);
        assert_eq!(back, w);
    }

    #[test]
    fn convolution_gradient_norm_matches_the_formed_gradient() {
        for (h, w, c_in, c_out) in [(7, 7, 3, 4), (3, 3, 16, 2), (2, 5, 1, 1), (1, 1, 2, 3)] {
            let t = h * w;
            let x: Vec<f32> = (0..t * c_in).map(|v| (v as f32 * 0.37).sin()).collect();
            let du: Vec<f32> = (0..t * c_out).map(|v| (v as f32 * 0.73).cos()).collect();
            let mut cols = vec![0f32; t * 9 * c_in];
            im2col(&x, 1, h, w, c_in, &mut cols);
            // The gradient du^T cols, formed by loops.
            let mut want = 0f64;
            for o in 0..c_out {
                for j in 0..9 * c_in {
                    let g: f64 = (0..t)
                        .map(|r| f64::from(du[r * c_out + o]) * f64::from(cols[r * 9 * c_in + j]))
                        .sum();
                    want += g * g;
                }
            }
            let mut scratch = Vec::new();
            let du_m = MatRef::new(&du, t, c_out).unwrap();
            let got = conv3x3_grad_norm_sq(
                du_m,
                MatRef::new(&x, t, c_in).unwrap(),
                (h, w),
                &mut scratch,
            )
            .unwrap();
            assert!((got / want - 1.0).abs() < 1e-5, "{h}x{w}: {got} vs {want}");
            // The input read as the centre columns of its im2col.
            let centre = MatRef::new(&cols, t, 9 * c_in)
                .unwrap()
                .columns(4 * c_in, c_in)
                .unwrap();
            let again = conv3x3_grad_norm_sq(du_m, centre, (h, w), &mut scratch).unwrap();
            assert!((again / want - 1.0).abs() < 1e-5);
        }
    }
}
