//! The CNN's hand-written training pass: forward and backward on plain
//! slices, every product one `gemm` call (module `model::gemm`), no
//! autograd graph, no gradient for the images, buffers kept between
//! minibatches.
//!
//! # Layout
//!
//! Activations are channels-last (`[N, H, W, C]`, one row of `C` values per
//! pixel), so a 3x3 convolution is one product: its im2col matrix
//! `[N * H * W, 9 * C_in]` (row = output pixel, columns ordered
//! `(ky, kx, c)`, zeros for the padding) times the kernel viewed as
//! `[C_out, 9 * C_in]` transposed. The kernel is re-laid out into that
//! `(ky, kx, c)` column order once per minibatch (PyTorch's is
//! `(c, ky, kx)`; a few thousand values), and its gradient back.
//!
//! Max-pooling runs on the convolution *before* bias and ReLU, which commute
//! with the max (`max(relu(v + b)) = relu(max(v) + b)`), so bias and ReLU
//! touch only the pooled values. Each pooled value remembers which of its
//! four inputs won (the first maximum), or that the ReLU cut it; the
//! backward pass sends its gradient to exactly that input, which is what
//! autograd computes (ties at a positive value, where candle would share
//! the gradient, do not occur with continuous data). The second pooling
//! writes its output channel-major, which is `fc1`'s input order
//! (PyTorch's `x.flatten(1)`).
//!
//! # Threads
//!
//! With `T > 1` threads (candle's setting, `RAYON_NUM_THREADS`), the
//! minibatch is cut into `T` shards that run the whole forward and backward
//! pass at once on rayon's pool, each with its own buffers and
//! single-threaded products; their gradients are summed. The small products
//! of this model do not split well inside `gemm`, and the element-wise
//! kernels (im2col, pooling) run in parallel too.

use gemm::Parallelism;
use rayon::prelude::*;

use super::CnnDims;
use crate::error::{ParticipantError, Result};
use crate::model::conv::{
    by_channels, col2im, column_sums, from_internal, im2col, sized, sized_u32, to_internal,
};
use crate::model::gemm::{MatRef, matmul};
use crate::model::softmax_cross_entropy_rows;

/// Flag of a pooled value's winner code (see [`pool_bias_relu`]) whose ReLU
/// was cut: no input gets its gradient.
const DEAD: u32 = 1 << 31;

/// The CNN's parameters as slices, PyTorch layout, [`CnnDims::layout`] order.
pub(super) struct Params<'a> {
    /// `conv1.weight [C1, I, 3, 3]`.
    pub conv1_w: &'a [f32],
    /// `conv1.bias [C1]`.
    pub conv1_b: &'a [f32],
    /// `conv2.weight [C2, C1, 3, 3]`.
    pub conv2_w: &'a [f32],
    /// `conv2.bias [C2]`.
    pub conv2_b: &'a [f32],
    /// `fc1.weight [H, F]`.
    pub fc1_w: &'a [f32],
    /// `fc1.bias [H]`.
    pub fc1_b: &'a [f32],
    /// `fc2.weight [K, H]`.
    pub fc2_w: &'a [f32],
    /// `fc2.bias [K]`.
    pub fc2_b: &'a [f32],
}

/// Buffers kept between minibatches (resized as needed, never shrunk).
#[derive(Default)]
pub(super) struct Workspace {
    /// `conv1.weight` as `[C1, 9 * I]`, columns `(ky, kx, i)`.
    conv1_w: Vec<f32>,
    /// `conv2.weight` as `[C2, 9 * C1]`, columns `(ky, kx, c)`.
    conv2_w: Vec<f32>,
    shards: Vec<Shard>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// One shard's activations and gradients.
#[derive(Default)]
struct Shard {
    /// Images channels-last `[n, R, W, I]` (only when `I > 1`).
    images: Vec<f32>,
    /// im2col of the images `[n * R * W, 9 * I]`.
    cols1: Vec<f32>,
    /// conv1 before bias `[n * R * W, C1]`; in the backward pass its gradient.
    pre1: Vec<f32>,
    /// Pool 1 output (after bias and ReLU) `[n, R/2, W/2, C1]`.
    pool1: Vec<f32>,
    /// Winner code per pool 1 value (see [`pool_bias_relu`]).
    win1: Vec<u32>,
    /// im2col of pool 1 `[n * R/2 * W/2, 9 * C1]`; in the backward pass
    /// its gradient.
    cols2: Vec<f32>,
    /// conv2 before bias `[n * R/2 * W/2, C2]`; in the backward pass its
    /// gradient.
    pre2: Vec<f32>,
    /// Winner code per pool 2 value, channel-major like `flat`.
    win2: Vec<u32>,
    /// Pool 2 output channel-major `[n, F]`: `fc1`'s input.
    flat: Vec<f32>,
    /// `[n, H]` after ReLU.
    hidden: Vec<f32>,
    /// `[n, K]`; then the loss gradient with respect to them.
    logits: Vec<f32>,
    d_hidden: Vec<f32>,
    d_flat: Vec<f32>,
    d_pool1: Vec<f32>,
    /// Sum of this shard's per-image losses.
    loss: f64,
    /// Gradients, conv kernels in the internal `(ky, kx, c)` order.
    grads: Grads,
}

/// Gradients of all parameters (see [`Params`]).
#[derive(Default)]
struct Grads {
    conv1_w: Vec<f32>,
    conv1_b: Vec<f32>,
    conv2_w: Vec<f32>,
    conv2_b: Vec<f32>,
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
}

impl Grads {
    fn as_mut(&mut self) -> [&mut Vec<f32>; 8] {
        [
            &mut self.conv1_w,
            &mut self.conv1_b,
            &mut self.conv2_w,
            &mut self.conv2_b,
            &mut self.fc1_w,
            &mut self.fc1_b,
            &mut self.fc2_w,
            &mut self.fc2_b,
        ]
    }
}

/// Mean cross-entropy of the minibatch `images [N, I, R, W]` (contiguous)
/// with `labels [N]`, and the gradients of all parameters in PyTorch
/// layout and [`CnnDims::layout`] order. `threads` is the number of shards
/// the batch may be cut into (at most one per image).
pub(super) fn loss_and_grads(
    d: &CnnDims,
    p: &Params<'_>,
    images: &[f32],
    labels: &[u32],
    ws: &mut Workspace,
    threads: usize,
) -> Result<(f32, Vec<Vec<f32>>)> {
    let n = labels.len();
    let image_len = d.planes * d.rows * d.cols;
    if n == 0 || Some(images.len()) != n.checked_mul(image_len) {
        return Err(ParticipantError::Model(format!(
            "cnn: {} labels for {} image values of {image_len} each",
            n,
            images.len()
        )));
    }
    let layout = d.layout();
    for (p, info) in p.all().iter().zip(&layout) {
        if p.len() != info.len() {
            return Err(ParticipantError::Model(format!(
                "cnn: {} holds {} values, expected {}",
                info.name,
                p.len(),
                info.len()
            )));
        }
    }
    check_pool_size(d.rows, d.cols, d.c1)?;
    check_pool_size(d.rows / 2, d.cols / 2, d.c2)?;
    to_internal(
        p.conv1_w,
        d.c1,
        d.planes,
        sized(&mut ws.conv1_w, p.conv1_w.len()),
    );
    to_internal(
        p.conv2_w,
        d.c2,
        d.c1,
        sized(&mut ws.conv2_w, p.conv2_w.len()),
    );
    let shards = threads.clamp(1, n);
    ws.shards
        .resize_with(shards.max(ws.shards.len()), Shard::default);
    let conv = (&ws.conv1_w[..], &ws.conv2_w[..]);
    let inv_n = 1.0 / n as f32;
    let run = |(s, shard): (usize, &mut Shard)| -> Result<()> {
        // Images [start, end) of the batch.
        let (start, end) = (s * n / shards, (s + 1) * n / shards);
        shard.run(
            d,
            p,
            conv,
            &images[start * image_len..end * image_len],
            &labels[start..end],
            inv_n,
        )
    };
    if shards == 1 {
        run((0, &mut ws.shards[0]))?;
    } else {
        ws.shards[..shards]
            .par_iter_mut()
            .enumerate()
            .map(run)
            .collect::<Result<()>>()?;
    }
    // Sum the shards' gradients into the first one.
    let (first, rest) = ws.shards[..shards].split_at_mut(1);
    let total = &mut first[0];
    for other in rest {
        total.loss += other.loss;
        for (t, o) in total.grads.as_mut().into_iter().zip(other.grads.as_mut()) {
            for (t, o) in t.iter_mut().zip(o.iter()) {
                *t += o;
            }
        }
    }
    let g = &mut total.grads;
    let mut out: Vec<Vec<f32>> = g.as_mut().into_iter().map(|v| v.clone()).collect();
    from_internal(&g.conv1_w, d.c1, d.planes, &mut out[0]);
    from_internal(&g.conv2_w, d.c2, d.c1, &mut out[2]);
    Ok(((total.loss / n as f64) as f32, out))
}

impl Params<'_> {
    fn all(&self) -> [&[f32]; 8] {
        [
            self.conv1_w,
            self.conv1_b,
            self.conv2_w,
            self.conv2_b,
            self.fc1_w,
            self.fc1_b,
            self.fc2_w,
            self.fc2_b,
        ]
    }
}

impl Shard {
    /// Forward and backward pass over `n` images `[n, I, R, W]`; leaves the
    /// summed loss (each image's scaled by `inv_n` in the gradients) and the
    /// gradients in `self`.
    fn run(
        &mut self,
        d: &CnnDims,
        p: &Params<'_>,
        (conv1_w, conv2_w): (&[f32], &[f32]),
        images: &[f32],
        labels: &[u32],
        inv_n: f32,
    ) -> Result<()> {
        let n = labels.len();
        let (r, w, i) = (d.rows, d.cols, d.planes);
        let (r1, w1) = (r / 2, w / 2);
        let (r2, w2) = (r1 / 2, w1 / 2);
        let (c1, c2, h, k) = (d.c1, d.c2, d.hidden, d.classes);
        let f = d.features();
        let (px0, px1, px2) = (n * r * w, n * r1 * w1, n * r2 * w2);
        let seq = Parallelism::None;
        let g = &mut self.grads;

        // conv1 -> pool1 (+ bias, ReLU).
        let nhwc: &[f32] = if i == 1 {
            images
        } else {
            let out = sized(&mut self.images, images.len());
            for (src, dst) in images
                .chunks_exact(i * r * w)
                .zip(out.chunks_exact_mut(i * r * w))
            {
                for (pi, plane) in src.chunks_exact(r * w).enumerate() {
                    for (px, &v) in plane.iter().enumerate() {
                        dst[px * i + pi] = v;
                    }
                }
            }
            out
        };
        let cols1 = sized(&mut self.cols1, px0 * 9 * i);
        im2col(nhwc, n, r, w, i, cols1);
        let pre1 = sized(&mut self.pre1, px0 * c1);
        let cols1 = MatRef::new(cols1, px0, 9 * i)?;
        matmul(
            pre1,
            cols1,
            MatRef::new(conv1_w, c1, 9 * i)?.t(),
            false,
            seq,
        )?;
        let pool1 = sized(&mut self.pool1, px1 * c1);
        let win1 = sized_u32(&mut self.win1, px1 * c1);
        let nhwc_out = PooledLayout::channels_last(r1 * w1, c1);
        pool_bias_relu(pre1, n, r, w, c1, p.conv1_b, pool1, win1, nhwc_out);

        // conv2 -> pool2 (+ bias, ReLU), channel-major = fc1's input.
        let cols2 = sized(&mut self.cols2, px1 * 9 * c1);
        im2col(pool1, n, r1, w1, c1, cols2);
        let pre2 = sized(&mut self.pre2, px1 * c2);
        let conv2_wm = MatRef::new(conv2_w, c2, 9 * c1)?;
        matmul(
            pre2,
            MatRef::new(cols2, px1, 9 * c1)?,
            conv2_wm.t(),
            false,
            seq,
        )?;
        let flat = sized(&mut self.flat, n * f);
        let win2 = sized_u32(&mut self.win2, px2 * c2);
        let flat_out = PooledLayout::channel_major(r2 * w2, c2);
        pool_bias_relu(pre2, n, r1, w1, c2, p.conv2_b, flat, win2, flat_out);

        // fc1 (+ ReLU), fc2, loss.
        let hidden = sized(&mut self.hidden, n * h);
        let flat_m = MatRef::new(flat, n, f)?;
        let fc1_w = MatRef::new(p.fc1_w, h, f)?;
        matmul(hidden, flat_m, fc1_w.t(), false, seq)?;
        for row in hidden.chunks_exact_mut(h) {
            for (v, b) in row.iter_mut().zip(p.fc1_b) {
                *v = (*v + b).max(0.0);
            }
        }
        let logits = sized(&mut self.logits, n * k);
        let hidden_m = MatRef::new(hidden, n, h)?;
        let fc2_w = MatRef::new(p.fc2_w, k, h)?;
        matmul(logits, hidden_m, fc2_w.t(), false, seq)?;
        for row in logits.chunks_exact_mut(k) {
            for (v, b) in row.iter_mut().zip(p.fc2_b) {
                *v += b;
            }
        }
        let z = logits.to_vec();
        self.loss = softmax_cross_entropy_rows(&z, k, labels, (inv_n, 0.0), logits)?;
        let d_logits = MatRef::new(logits, n, k)?;

        // fc2 backward.
        matmul(
            sized(&mut g.fc2_w, k * h),
            d_logits.t(),
            hidden_m,
            false,
            seq,
        )?;
        column_sums(logits, k, sized(&mut g.fc2_b, k));
        let d_hidden = sized(&mut self.d_hidden, n * h);
        matmul(d_hidden, d_logits, fc2_w, false, seq)?;
        for (dh, &a) in d_hidden.iter_mut().zip(hidden.iter()) {
            if a <= 0.0 {
                *dh = 0.0;
            }
        }
        // fc1 backward.
        let d_hidden_m = MatRef::new(d_hidden, n, h)?;
        matmul(
            sized(&mut g.fc1_w, h * f),
            d_hidden_m.t(),
            flat_m,
            false,
            seq,
        )?;
        column_sums(d_hidden, h, sized(&mut g.fc1_b, h));
        let d_flat = sized(&mut self.d_flat, n * f);
        matmul(d_flat, d_hidden_m, fc1_w, false, seq)?;

        // pool2 / conv2 backward: pre2 becomes its gradient.
        let d_b2 = sized(&mut g.conv2_b, c2);
        unpool(d_flat, win2, n, c2, pre2, d_b2);
        let d_pre2 = MatRef::new(pre2, px1, c2)?;
        let cols2_m = MatRef::new(cols2, px1, 9 * c1)?;
        matmul(
            sized(&mut g.conv2_w, c2 * 9 * c1),
            d_pre2.t(),
            cols2_m,
            false,
            seq,
        )?;
        // cols2 becomes its gradient, summed back onto pool1's pixels.
        matmul(cols2, d_pre2, conv2_wm, false, seq)?;
        let d_pool1 = sized(&mut self.d_pool1, px1 * c1);
        col2im(cols2, n, r1, w1, c1, d_pool1);

        // pool1 / conv1 backward: pre1 becomes its gradient.
        let d_b1 = sized(&mut g.conv1_b, c1);
        unpool(d_pool1, win1, n, c1, pre1, d_b1);
        let d_pre1 = MatRef::new(pre1, px0, c1)?;
        matmul(
            sized(&mut g.conv1_w, c1 * 9 * i),
            d_pre1.t(),
            cols1,
            false,
            seq,
        )?;
        Ok(())
    }
}

/// Where [`pool_bias_relu`] writes pooled value `(image, pixel, channel)`:
/// at `image * image + pixel * pixel + channel * channel`.
#[derive(Clone, Copy)]
struct PooledLayout {
    image: usize,
    pixel: usize,
    channel: usize,
}

impl PooledLayout {
    /// `[N, pixels, C]`.
    fn channels_last(pixels: usize, c: usize) -> Self {
        Self {
            image: pixels * c,
            pixel: c,
            channel: 1,
        }
    }

    /// `[N, C, pixels]`.
    fn channel_major(pixels: usize, c: usize) -> Self {
        Self {
            image: pixels * c,
            pixel: 1,
            channel: pixels,
        }
    }
}

/// 2x2 max-pooling (stride 2, odd last row and column dropped) of the
/// channels-last `x [n, h, w, c]`, then `relu(max + bias[c])`, written to
/// `out` in layout `lay`. `win` (same layout) gets each pooled value's
/// winner code: the offset of its first maximum inside its image's `x`
/// (below [`DEAD`]: [`check_pool_size`]), plus [`DEAD`] when the ReLU cut it.
#[allow(clippy::too_many_arguments)]
fn pool_bias_relu(
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    bias: &[f32],
    out: &mut [f32],
    win: &mut [u32],
    lay: PooledLayout,
) {
    by_channels!(c, pool_bias_relu_c(x, n, h, w, c, bias, out, win, lay));
}

/// [`pool_bias_relu`] for `C` channels (`C = 0`: `c`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pool_bias_relu_c<const C: usize>(
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    bias: &[f32],
    out: &mut [f32],
    win: &mut [u32],
    lay: PooledLayout,
) {
    let c = if C == 0 { c } else { C };
    let (ph, pw) = (h / 2, w / 2);
    let bias = &bias[..c];
    let mut pooled = vec![0f32; c];
    let mut codes = vec![0u32; c];
    for img in 0..n {
        let x = &x[img * h * w * c..][..h * w * c];
        for py in 0..ph {
            let row0 = &x[2 * py * w * c..][..w * c];
            let row1 = &x[(2 * py + 1) * w * c..][..w * c];
            for px in 0..pw {
                let (a, b) = (&row0[2 * px * c..][..c], &row0[(2 * px + 1) * c..][..c]);
                let (d, e) = (&row1[2 * px * c..][..c], &row1[(2 * px + 1) * c..][..c]);
                // Offsets of the four inputs of channel 0 (fit u32, see above).
                let o = ((2 * py * w + 2 * px) * c) as u32;
                let (ob, od) = (o + c as u32, o + (w * c) as u32);
                let oe = od + c as u32;
                let lanes = pooled.iter_mut().zip(codes.iter_mut()).zip(bias);
                for (ch, ((out, code), &bias)) in lanes.enumerate() {
                    let (mut m, mut k) = (a[ch], o);
                    if b[ch] > m {
                        (m, k) = (b[ch], ob);
                    }
                    if d[ch] > m {
                        (m, k) = (d[ch], od);
                    }
                    if e[ch] > m {
                        (m, k) = (e[ch], oe);
                    }
                    let v = m + bias;
                    let alive = v > 0.0;
                    *out = if alive { v } else { 0.0 };
                    *code = (k + ch as u32) | if alive { 0 } else { DEAD };
                }
                let base = img * lay.image + (py * pw + px) * lay.pixel;
                if lay.channel == 1 {
                    out[base..base + c].copy_from_slice(&pooled);
                    win[base..base + c].copy_from_slice(&codes);
                } else {
                    for (ch, (&v, &k)) in pooled.iter().zip(&codes).enumerate() {
                        out[base + ch * lay.channel] = v;
                        win[base + ch * lay.channel] = k;
                    }
                }
            }
        }
    }
}

/// Refuses activations `[h, w, c]` whose offsets do not fit below
/// [`DEAD`] (winner codes of [`pool_bias_relu`]).
fn check_pool_size(h: usize, w: usize, c: usize) -> Result<()> {
    match h.checked_mul(w).and_then(|v| v.checked_mul(c)) {
        Some(len) if len <= DEAD as usize => Ok(()),
        _ => Err(ParticipantError::Model(format!(
            "cnn: activations {h}x{w}x{c} too large"
        ))),
    }
}

/// Backward of [`pool_bias_relu`] for `n` images: the gradient `g` of the
/// pooled values goes to their winning inputs in `dx [n, h, w, c]` (zeros
/// elsewhere, nothing where the ReLU was cut); `db [c]` gets the
/// per-channel sums (the bias gradient). `g` and `win` share a layout.
fn unpool(g: &[f32], win: &[u32], n: usize, c: usize, dx: &mut [f32], db: &mut [f32]) {
    dx.fill(0.0);
    let (pooled, image) = (g.len() / n.max(1), dx.len() / n.max(1));
    if pooled > 0 && image > 0 {
        let images = dx
            .chunks_exact_mut(image)
            .zip(g.chunks_exact(pooled))
            .zip(win.chunks_exact(pooled));
        for ((dx, g), win) in images {
            for (&g, &code) in g.iter().zip(win) {
                // Codes are in range (see pool_bias_relu); `get_mut` only keeps this safe.
                if let Some(d) = dx.get_mut((code & !DEAD) as usize) {
                    *d = if code & DEAD == 0 { g } else { 0.0 };
                }
            }
        }
    }
    column_sums(dx, c, db);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winner_codes_must_fit_below_the_dead_flag() {
        assert!(check_pool_size(1 << 16, 1 << 15, 1).is_ok());
        let e = check_pool_size(1 << 16, 1 << 15, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        assert!(check_pool_size(usize::MAX, 2, 1).is_err());
    }
}
