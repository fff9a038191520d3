//! The grid CNN's hand-written training pass (CPU): forward and backward on
//! plain slices, every product one `gemm` call, no autograd graph, no
//! gradient for the images, buffers kept between minibatches. Checked
//! against candle's autograd and finite differences in the tests.
//!
//! Activations are channels-last (`[n, cells, C]`), so a 3x3 convolution is
//! one product of its im2col matrix with the kernel (module `model::conv`,
//! shared with the CNN), and per image the token map is one product
//! `M [T, T] @ embed [T, D]`. The gradient of a convolution's input is the
//! convolution of its output's gradient with the flipped kernel (`dx[q, c]
//! = sum dy[q + (ky-1, kx-1), o] W[o, c, 2-ky, 2-kx]`): one more im2col and
//! a product whose inner dimension is `9 * C_out`, rather than a product
//! with inner dimension `C_out` and a scatter (col2im) of `9x` as many
//! values. With `T > 1` threads the minibatch is cut into
//! shards that run the whole pass at once on rayon's pool, each with its
//! own buffers and single-threaded products; their gradients are summed.
//!
//! ```text
//! e  = patches We^T + be         [n*T, D]     (per position with a per-patch embedding)
//! z  = M e_n + bm                [n*T, D]     a0 = GELU(z)
//! u1 = im2col(a0) W1^T + b1      [n*T, C1]    a1 = GELU(u1)
//! u2 = im2col(a1) W2^T + b2      [n*T, C2]    a2 = GELU(u2)
//! p  = maxpool2x2(a2)            [n*T', C2]
//! u3 = im2col(p) W3^T + b3       [n*T', C3]   a3 = GELU(u3)
//! f  = mean over cells of a3     [n, C3]      logits = f Wh^T + bh
//! ```

use gemm::Parallelism;
use rayon::prelude::*;

use super::GridCnnDims;
use crate::error::{ParticipantError, Result};
use crate::model::conv::{
    column_sums, conv3x3_grad_norm_sq, from_internal, im2col, sized, sized_u32, to_internal,
};
use crate::model::gemm::{MatRef, matmul, product_grad_norm_sq, sum_of_squares};
use crate::model::ops::{bias_gelu_in_place, gelu_in_place};
use crate::model::{clip_factor, softmax_cross_entropy_rows};

/// Number of parameter tensors (see [`GridCnnDims::layout`]).
const TENSORS: usize = 12;

/// Buffers kept between minibatches (resized as needed, never shrunk).
#[derive(Default)]
pub(super) struct Workspace {
    /// The three convolution kernels as `[C, 9 * C_in]`, columns
    /// `(ky, kx, c)`.
    kernels: [Vec<f32>; 3],
    /// The three kernels flipped for the input gradients, `[C_in, 9 * C]`,
    /// columns `(ky, kx, o)`: `W[o, c, 2 - ky, 2 - kx]`.
    flipped: [Vec<f32>; 3],
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
    /// Patches `[n * T, I*P*P]`, or `[T, n, I*P*P]` per position.
    patches: Vec<f32>,
    /// Patch embeddings `[n, T, D]`; in the backward pass their gradient.
    embed: Vec<f32>,
    /// Per-position embeddings or their gradient `[T, n, D]` (per-patch
    /// embedding only).
    by_position: Vec<f32>,
    /// GELU of the token map `[n * T, D]`, then its gradient.
    a0: Vec<f32>,
    dgelu0: Vec<f32>,
    /// im2col of `a0`.
    cols1: Vec<f32>,
    /// im2col of a convolution's output gradient.
    d_cols: Vec<f32>,
    a1: Vec<f32>,
    dgelu1: Vec<f32>,
    cols2: Vec<f32>,
    a2: Vec<f32>,
    dgelu2: Vec<f32>,
    /// Pooled `a2` `[n * T', C2]`, then its gradient.
    pooled: Vec<f32>,
    /// Offset (inside its image's `a2`) of each pooled value's maximum.
    winners: Vec<u32>,
    cols3: Vec<f32>,
    a3: Vec<f32>,
    dgelu3: Vec<f32>,
    /// Mean over the cells `[n, C3]`, then its gradient.
    features: Vec<f32>,
    d_features: Vec<f32>,
    /// `[n, K]`; then the loss gradient with respect to them.
    logits: Vec<f32>,
    /// Sum of this shard's per-image losses.
    loss: f64,
    /// The gradient of the patch embeddings `[n, T, D]`.
    d_embed: Vec<f32>,
    /// Room for one image's Gram matrices or gradient ([`Shard::clip_images`]).
    scratch: Vec<f32>,
    /// Gradients in the variables' layout (conv kernels in the internal
    /// column order until the end).
    grads: [Vec<f32>; TENSORS],
    /// Sums of the gradients of a shard's chunks.
    sums: [Vec<f32>; TENSORS],
    /// Each image's gradient norm before clipping
    /// ([`Reduction::ClippedSum`]).
    norms: Vec<f32>,
}

/// How [`loss_and_grads`] combines the examples' gradients.
#[derive(Clone, Copy, Debug)]
pub(super) enum Reduction {
    /// The gradient of the mean loss over `batch` examples.
    Mean {
        /// The minibatch size.
        batch: usize,
    },
    /// Each example's gradient of its own loss clipped to L2 norm `clip`,
    /// summed (DP-SGD).
    ClippedSum {
        /// The clip norm.
        clip: f32,
    },
}

/// What [`loss_and_grads`] gives.
pub(super) struct Pass {
    /// Sum of the examples' losses.
    pub loss_sum: f64,
    /// The reduced gradients (see [`Reduction`]).
    pub grads: Vec<Vec<f32>>,
    /// Each example's gradient norm before clipping, in batch order
    /// ([`Reduction::ClippedSum`] only; empty otherwise).
    pub norms: Vec<f32>,
}

/// Cross-entropy of the minibatch `images [N, I, R, W]` (contiguous)
/// with `labels [N]`, and the gradients of all parameters, reduced as
/// `reduction` says; `params` and the
/// result in [`GridCnnDims::layout`] order, in the layout of the
/// [`GridCnn`](super::GridCnn)'s variables (a per-position patch embedding
/// weight as `[T, I*P*P, D]`). `threads` is the number of shards the batch
/// may be cut into (at most one per image).
pub(super) fn loss_and_grads(
    d: &GridCnnDims,
    params: &[&[f32]],
    images: &[f32],
    (labels, smoothing): (&[u32], f32),
    reduction: Reduction,
    ws: &mut Workspace,
    threads: usize,
) -> Result<Pass> {
    let n = labels.len();
    let image_len = d.planes * d.rows * d.cols;
    if n == 0 || Some(images.len()) != n.checked_mul(image_len) {
        return Err(ParticipantError::Model(format!(
            "gridcnn: {n} labels for {} image values of {image_len} each",
            images.len()
        )));
    }
    let layout = d.layout();
    if params.len() != TENSORS {
        return Err(ParticipantError::Model(format!(
            "gridcnn: {} parameter tensors, expected {TENSORS}",
            params.len()
        )));
    }
    for (p, info) in params.iter().zip(&layout) {
        if p.len() != info.len() {
            return Err(ParticipantError::Model(format!(
                "gridcnn: {} holds {} values, expected {}",
                info.name,
                p.len(),
                info.len()
            )));
        }
    }
    if d.tokens()
        .checked_mul(d.c1.max(d.c2).max(d.dim))
        .is_none_or(|v| v > u32::MAX as usize)
    {
        return Err(ParticipantError::Model(
            "gridcnn: activations too large".into(),
        ));
    }
    let fan_ins = [d.dim, d.c1, d.c2];
    for (j, (&c_in, c_out)) in fan_ins.iter().zip([d.c1, d.c2, d.c3]).enumerate() {
        let w = params[4 + 2 * j];
        to_internal(w, c_out, c_in, sized(&mut ws.kernels[j], w.len()));
        flip(w, c_out, c_in, sized(&mut ws.flipped[j], w.len()));
    }
    let shards = threads.clamp(1, n);
    ws.shards
        .resize_with(shards.max(ws.shards.len()), Shard::default);
    let kernels = [&ws.kernels[0][..], &ws.kernels[1], &ws.kernels[2]];
    let flipped = [&ws.flipped[0][..], &ws.flipped[1], &ws.flipped[2]];
    let run = |(s, shard): (usize, &mut Shard)| -> Result<()> {
        let (start, end) = (s * n / shards, (s + 1) * n / shards);
        shard.run_chunks(
            d,
            params,
            (kernels, flipped),
            &images[start * image_len..end * image_len],
            &labels[start..end],
            (reduction, smoothing),
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
    let (first, rest) = ws.shards[..shards].split_at_mut(1);
    let total = &mut first[0];
    for other in rest {
        total.loss += other.loss;
        total.norms.extend_from_slice(&other.norms);
        for (t, o) in total.grads.iter_mut().zip(&other.grads) {
            for (t, o) in t.iter_mut().zip(o) {
                *t += o;
            }
        }
    }
    let mut out: Vec<Vec<f32>> = total.grads.to_vec();
    for (j, (&c_in, c_out)) in fan_ins.iter().zip([d.c1, d.c2, d.c3]).enumerate() {
        from_internal(&total.grads[4 + 2 * j], c_out, c_in, &mut out[4 + 2 * j]);
    }
    Ok(Pass {
        loss_sum: total.loss,
        grads: out,
        norms: std::mem::take(&mut total.norms),
    })
}

/// Kernel `[O, C, 3, 3]` (PyTorch) to the flipped `[C, 3, 3, O]` that maps
/// the im2col of an output gradient to the input gradient.
fn flip(w: &[f32], o: usize, c: usize, out: &mut [f32]) {
    for oi in 0..o {
        for ci in 0..c {
            for k in 0..9 {
                out[(ci * 9 + k) * o + oi] = w[(oi * c + ci) * 9 + 8 - k];
            }
        }
    }
}

/// Image `img`'s `[rows, cols]` of a buffer holding `[n, rows, cols]`.
fn image_rows(buf: &[f32], img: usize, rows: usize, cols: usize) -> Result<MatRef<'_>> {
    MatRef::new(
        exact(&buf[(img * rows * cols).min(buf.len())..], rows * cols)?,
        rows,
        cols,
    )
}

/// The first `len` values of a buffer (which may be longer).
fn exact(buf: &[f32], len: usize) -> Result<&[f32]> {
    buf.get(..len)
        .ok_or_else(|| ParticipantError::Model("gridcnn: buffer too short".into()))
}

/// `x[i] *= dg[i]`.
fn times(x: &mut [f32], dg: &[f32]) {
    for (v, g) in x.iter_mut().zip(dg) {
        *v *= g;
    }
}

/// Copies the patches of `images [n, I, R, W]` into `out`: `[n * T, I*P*P]`
/// (rows image-major), or `[T, n, I*P*P]` when `by_position`; each patch's
/// values ordered plane, row, column.
fn gather_patches(d: &GridCnnDims, images: &[f32], n: usize, by_position: bool, out: &mut [f32]) {
    let (p, gr, gc) = (d.patch, d.rows / d.patch, d.cols / d.patch);
    let (t, pl) = (gr * gc, d.patch_len());
    let plane = d.rows * d.cols;
    for img in 0..n {
        let src = &images[img * d.planes * plane..][..d.planes * plane];
        for cell in 0..t {
            let row = if by_position {
                cell * n + img
            } else {
                img * t + cell
            };
            let dst = &mut out[row * pl..][..pl];
            let (y0, x0) = ((cell / gc) * p, (cell % gc) * p);
            for plane_i in 0..d.planes {
                for py in 0..p {
                    let from = plane_i * plane + (y0 + py) * d.cols + x0;
                    dst[(plane_i * p + py) * p..][..p].copy_from_slice(&src[from..from + p]);
                }
            }
        }
    }
}

/// 2x2 max-pooling (stride 2, odd last row and column dropped) of the
/// channels-last `x [n, h, w, c]` into `out [n, h/2, w/2, c]`; `win` gets
/// the offset of each pooled value's first maximum inside its image's `x`.
fn max_pool(
    x: &[f32],
    n: usize,
    (h, w, c): (usize, usize, usize),
    out: &mut [f32],
    win: &mut [u32],
) {
    let (ph, pw) = (h / 2, w / 2);
    for img in 0..n {
        let x = &x[img * h * w * c..][..h * w * c];
        for py in 0..ph {
            for px in 0..pw {
                let base = (img * ph * pw + py * pw + px) * c;
                let corner = (2 * py * w + 2 * px) * c;
                let offsets = [corner, corner + c, corner + w * c, corner + w * c + c];
                for ch in 0..c {
                    let (mut m, mut k) = (x[offsets[0] + ch], offsets[0] + ch);
                    for &o in &offsets[1..] {
                        if x[o + ch] > m {
                            (m, k) = (x[o + ch], o + ch);
                        }
                    }
                    out[base + ch] = m;
                    // Fits: checked against u32::MAX in loss_and_grads.
                    win[base + ch] = k as u32;
                }
            }
        }
    }
}

/// Backward of [`max_pool`]: `dx [n, image]` gets each pooled gradient at
/// its winner, zeros elsewhere.
fn unpool(g: &[f32], win: &[u32], n: usize, dx: &mut [f32]) {
    dx.fill(0.0);
    let (pooled, image) = (g.len() / n.max(1), dx.len() / n.max(1));
    if pooled == 0 || image == 0 {
        return;
    }
    for ((dx, g), win) in dx
        .chunks_exact_mut(image)
        .zip(g.chunks_exact(pooled))
        .zip(win.chunks_exact(pooled))
    {
        for (&g, &k) in g.iter().zip(win) {
            if let Some(v) = dx.get_mut(k as usize) {
                *v += g;
            }
        }
    }
}

/// The sizes of one pass, from the dimensions: the `gr x gc` grid of `t`
/// cells, the pooled `hr x hc` grid of `t2`, patch length `pl`, channels
/// `dim`, `c1`, `c2`, `c3` and classes `k`.
#[derive(Clone, Copy)]
struct Sizes {
    gr: usize,
    gc: usize,
    hr: usize,
    hc: usize,
    t: usize,
    t2: usize,
    pl: usize,
    dim: usize,
    c1: usize,
    c2: usize,
    c3: usize,
    k: usize,
}

impl Sizes {
    fn of(d: &GridCnnDims) -> Self {
        let (gr, gc) = (d.rows / d.patch, d.cols / d.patch);
        let (hr, hc) = (gr / 2, gc / 2);
        Self {
            gr,
            gc,
            hr,
            hc,
            t: gr * gc,
            t2: hr * hc,
            pl: d.patch_len(),
            dim: d.dim,
            c1: d.c1,
            c2: d.c2,
            c3: d.c3,
            k: d.classes,
        }
    }
}

/// Images per forward and backward pass inside a shard: small enough that
/// a pass's im2col matrices stay in the core's cache (measured on one thread: 1.1x the
/// throughput of whole 64-image batches; 8 the same, 32 slower), large enough for
/// efficient products.
pub(super) const CHUNK: usize = 16;

impl Shard {
    /// [`Shard::run`] over the shard's images in chunks of [`CHUNK`], the
    /// losses and gradients summed in `self.loss` and `self.grads` (for
    /// [`Reduction::ClippedSum`] each image's gradient clipped, its norm in
    /// `self.norms`).
    fn run_chunks(
        &mut self,
        d: &GridCnnDims,
        p: &[&[f32]],
        kernels: ([&[f32]; 3], [&[f32]; 3]),
        images: &[f32],
        labels: &[u32],
        (reduction, smoothing): (Reduction, f32),
    ) -> Result<()> {
        let image_len = images.len() / labels.len().max(1);
        let (scale, clip) = match reduction {
            Reduction::Mean { batch } => (1.0 / batch as f32, None),
            Reduction::ClippedSum { clip } => (1.0, Some(clip)),
        };
        self.norms.clear();
        let mut loss = 0.0;
        let chunks = labels.chunks(CHUNK).zip(images.chunks(CHUNK * image_len));
        for (i, (labels, images)) in chunks.enumerate() {
            self.run(d, p, kernels, images, labels, (scale, smoothing, clip))?;
            loss += self.loss;
            for (sum, g) in self.sums.iter_mut().zip(&self.grads) {
                if i == 0 {
                    sum.clone_from(g);
                } else {
                    for (s, g) in sum.iter_mut().zip(g) {
                        *s += g;
                    }
                }
            }
        }
        self.loss = loss;
        std::mem::swap(&mut self.grads, &mut self.sums);
        Ok(())
    }

    /// Forward and backward pass over `n` images; leaves the summed loss
    /// (each image's scaled by `scale` in the gradients, labels smoothed by
    /// `smoothing`) and the gradients in `self`.
    fn run(
        &mut self,
        d: &GridCnnDims,
        p: &[&[f32]],
        (kernels, flipped): ([&[f32]; 3], [&[f32]; 3]),
        images: &[f32],
        labels: &[u32],
        (scale, smoothing, clip): (f32, f32, Option<f32>),
    ) -> Result<()> {
        let n = labels.len();
        let Sizes {
            gr,
            gc,
            hr,
            hc,
            t,
            t2,
            pl,
            dim,
            c1,
            c2,
            c3,
            k,
        } = Sizes::of(d);
        let seq = Parallelism::None;

        // Patch embedding -> embed [n, T, D].
        let patches = sized(&mut self.patches, n * t * pl);
        gather_patches(d, images, n, d.per_patch, patches);
        let embed = sized(&mut self.embed, n * t * dim);
        if d.per_patch {
            let by_pos = sized(&mut self.by_position, t * n * dim);
            for cell in 0..t {
                let out = &mut by_pos[cell * n * dim..][..n * dim];
                let x = MatRef::new(&patches[cell * n * pl..], n, pl)?;
                let w = MatRef::new(&p[0][cell * pl * dim..], pl, dim)?;
                matmul(out, x, w, false, seq)?;
                let bias = &p[1][cell * dim..][..dim];
                for (img, row) in out.chunks_exact(dim).enumerate() {
                    let dst = &mut embed[(img * t + cell) * dim..][..dim];
                    for ((o, v), b) in dst.iter_mut().zip(row).zip(bias) {
                        *o = v + b;
                    }
                }
            }
        } else {
            let x = MatRef::new(patches, n * t, pl)?;
            matmul(embed, x, MatRef::new(p[0], dim, pl)?.t(), false, seq)?;
            for row in embed.chunks_exact_mut(dim) {
                for (v, b) in row.iter_mut().zip(p[1]) {
                    *v += b;
                }
            }
        }

        // Token map -> a0 [n * T, D].
        let token_map = MatRef::new(p[2], t, t)?;
        let a0 = sized(&mut self.a0, n * t * dim);
        let dgelu0 = sized(&mut self.dgelu0, n * t * dim);
        for img in 0..n {
            let e = MatRef::new(&embed[img * t * dim..], t, dim)?;
            matmul(
                &mut a0[img * t * dim..][..t * dim],
                token_map,
                e,
                false,
                seq,
            )?;
        }
        for (row, cell) in a0.chunks_exact_mut(dim).zip((0..t).cycle()) {
            let b = p[3][cell];
            row.iter_mut().for_each(|v| *v += b);
        }
        gelu_in_place(a0, dgelu0);

        // conv1, conv2 on the grid.
        let cols1 = sized(&mut self.cols1, n * t * 9 * dim);
        im2col(a0, n, gr, gc, dim, cols1);
        let a1 = sized(&mut self.a1, n * t * c1);
        let w1 = MatRef::new(kernels[0], c1, 9 * dim)?;
        matmul(a1, MatRef::new(cols1, n * t, 9 * dim)?, w1.t(), false, seq)?;
        let dgelu1 = sized(&mut self.dgelu1, n * t * c1);
        bias_gelu_in_place(a1, p[5], dgelu1);
        let cols2 = sized(&mut self.cols2, n * t * 9 * c1);
        im2col(a1, n, gr, gc, c1, cols2);
        let a2 = sized(&mut self.a2, n * t * c2);
        let w2 = MatRef::new(kernels[1], c2, 9 * c1)?;
        matmul(a2, MatRef::new(cols2, n * t, 9 * c1)?, w2.t(), false, seq)?;
        let dgelu2 = sized(&mut self.dgelu2, n * t * c2);
        bias_gelu_in_place(a2, p[7], dgelu2);

        // Pool, conv3, mean, head, loss.
        let pooled = sized(&mut self.pooled, n * t2 * c2);
        let winners = sized_u32(&mut self.winners, n * t2 * c2);
        max_pool(a2, n, (gr, gc, c2), pooled, winners);
        let cols3 = sized(&mut self.cols3, n * t2 * 9 * c2);
        im2col(pooled, n, hr, hc, c2, cols3);
        let a3 = sized(&mut self.a3, n * t2 * c3);
        let w3 = MatRef::new(kernels[2], c3, 9 * c2)?;
        matmul(a3, MatRef::new(cols3, n * t2, 9 * c2)?, w3.t(), false, seq)?;
        let dgelu3 = sized(&mut self.dgelu3, n * t2 * c3);
        bias_gelu_in_place(a3, p[9], dgelu3);
        let features = sized(&mut self.features, n * c3);
        let inv_cells = 1.0 / t2 as f32;
        for (f, cells) in features.chunks_exact_mut(c3).zip(a3.chunks_exact(t2 * c3)) {
            column_sums(cells, c3, f);
            f.iter_mut().for_each(|v| *v *= inv_cells);
        }
        let logits = sized(&mut self.logits, n * k);
        let f_m = MatRef::new(features, n, c3)?;
        let head = MatRef::new(p[10], k, c3)?;
        matmul(logits, f_m, head.t(), false, seq)?;
        for row in logits.chunks_exact_mut(k) {
            for (v, b) in row.iter_mut().zip(p[11]) {
                *v += b;
            }
        }
        let z = logits.to_vec();
        self.loss = softmax_cross_entropy_rows(&z, k, labels, (scale, smoothing), logits)?;

        // Backward signals: the gradients of every layer's output before
        // its bias and activation, overwriting the activations (the weight
        // gradients come from them after, in `weight_grads`).
        let d_logits = MatRef::new(logits, n, k)?;
        let d_features = sized(&mut self.d_features, n * c3);
        matmul(d_features, d_logits, head, false, seq)?;
        // Mean and conv3: a3 becomes du3.
        for (cells, df) in a3
            .chunks_exact_mut(t2 * c3)
            .zip(d_features.chunks_exact(c3))
        {
            for row in cells.chunks_exact_mut(c3) {
                for (v, g) in row.iter_mut().zip(df) {
                    *v = g * inv_cells;
                }
            }
        }
        times(a3, dgelu3);
        let d_cols = sized(&mut self.d_cols, n * t2 * 9 * c3);
        im2col(a3, n, hr, hc, c3, d_cols);
        let d_cols_m = MatRef::new(d_cols, n * t2, 9 * c3)?;
        let flip3 = MatRef::new(flipped[2], c2, 9 * c3)?;
        matmul(pooled, d_cols_m, flip3.t(), false, seq)?;
        // Pool and conv2: a2 becomes du2.
        unpool(pooled, winners, n, a2);
        times(a2, dgelu2);
        let d_cols = sized(&mut self.d_cols, n * t * 9 * c2);
        im2col(a2, n, gr, gc, c2, d_cols);
        let d_cols_m = MatRef::new(d_cols, n * t, 9 * c2)?;
        let flip2 = MatRef::new(flipped[1], c1, 9 * c2)?;
        matmul(a1, d_cols_m, flip2.t(), false, seq)?;
        // conv1: a1 becomes du1, a0 the token map's output gradient dz.
        times(a1, dgelu1);
        let d_cols = sized(&mut self.d_cols, n * t * 9 * c1);
        im2col(a1, n, gr, gc, c1, d_cols);
        let d_cols_m = MatRef::new(d_cols, n * t, 9 * c1)?;
        let flip1 = MatRef::new(flipped[0], dim, 9 * c1)?;
        matmul(a0, d_cols_m, flip1.t(), false, seq)?;
        times(a0, dgelu0);
        // Token map: de_n = M^T dz_n.
        let d_embed = sized(&mut self.d_embed, n * t * dim);
        for img in 0..n {
            let dz = MatRef::new(&a0[img * t * dim..], t, dim)?;
            matmul(
                &mut d_embed[img * t * dim..][..t * dim],
                token_map.t(),
                dz,
                false,
                seq,
            )?;
        }

        if let Some(clip) = clip {
            self.clip_images(d, n, clip)?;
        }
        self.weight_grads(d, n)
    }

    /// DP-SGD inside the pass: each image's gradient norm over all
    /// parameters, from its backward signals and the layers' inputs
    /// ([`product_grad_norm_sq`]: a ghost norm where cheaper than forming
    /// the image's gradient), pushed to `self.norms`; then every signal of
    /// the image scaled by its clip factor, so that the weight gradients
    /// formed from the signals are the sum of the clipped ones.
    fn clip_images(&mut self, d: &GridCnnDims, n: usize, clip: f32) -> Result<()> {
        let Sizes {
            gr,
            gc,
            hr,
            hc,
            t,
            t2,
            pl,
            dim,
            c1,
            c2,
            c3,
            k,
        } = Sizes::of(d);
        for img in 0..n {
            let image = |buf, rows, cols| image_rows(buf, img, rows, cols);
            let bias_sq = |du: MatRef<'_>, buf: &mut Vec<f32>| {
                let sums = sized(buf, du.cols());
                column_sums(du.data(), du.cols(), sums);
                sum_of_squares(sums)
            };
            let scratch = &mut self.scratch;
            // Head: a product with one row per image.
            let d_logits = image(&self.logits, 1, k)?;
            let mut sq = sum_of_squares(d_logits.data())
                * (sum_of_squares(image(&self.features, 1, c3)?.data()) + 1.0);
            // Convolutions: their inputs are the centre columns of the im2col.
            for (du, cols, c_in, grid) in [
                (image(&self.a3, t2, c3)?, &self.cols3, c2, (hr, hc)),
                (image(&self.a2, t, c2)?, &self.cols2, c1, (gr, gc)),
                (image(&self.a1, t, c1)?, &self.cols1, dim, (gr, gc)),
            ] {
                let x = image(cols, grid.0 * grid.1, 9 * c_in)?.columns(4 * c_in, c_in)?;
                sq += conv3x3_grad_norm_sq(du, x, grid, scratch)? + bias_sq(du, scratch);
            }
            // Token map: dM = dz e^T, a product over the D channels; its
            // bias gets the row sums of dz.
            let dz = image(&self.a0, t, dim)?;
            sq += product_grad_norm_sq(dz.t(), image(&self.embed, t, dim)?.t(), scratch)?;
            sq += dz
                .data()
                .chunks_exact(dim)
                .map(|row| f64::from(row.iter().sum::<f32>()).powi(2))
                .sum::<f64>();
            // Patch embedding: shared, or one product per position.
            let de = image(&self.d_embed, t, dim)?;
            if d.per_patch {
                for (cell, de) in de.data().chunks_exact(dim).enumerate() {
                    let patch = &self.patches[(cell * n + img) * pl..][..pl];
                    sq += sum_of_squares(de) * (sum_of_squares(patch) + 1.0);
                }
            } else {
                sq += product_grad_norm_sq(de, image(&self.patches, t, pl)?, scratch)?
                    + bias_sq(de, scratch);
            }
            let norm = sq.sqrt();
            self.norms.push(norm as f32);
            let factor = clip_factor(norm, f64::from(clip)) as f32;
            if factor != 1.0 {
                for (buf, len) in [
                    (&mut self.logits, k),
                    (&mut self.a3, t2 * c3),
                    (&mut self.a2, t * c2),
                    (&mut self.a1, t * c1),
                    (&mut self.a0, t * dim),
                    (&mut self.d_embed, t * dim),
                ] {
                    buf[img * len..][..len]
                        .iter_mut()
                        .for_each(|v| *v *= factor);
                }
            }
        }
        Ok(())
    }

    /// The weight gradients of a pass, summed over its `n` images, from the
    /// backward signals [`Shard::run`] left.
    fn weight_grads(&mut self, d: &GridCnnDims, n: usize) -> Result<()> {
        let Sizes {
            t,
            t2,
            pl,
            dim,
            c1,
            c2,
            c3,
            k,
            ..
        } = Sizes::of(d);
        let seq = Parallelism::None;
        let g = &mut self.grads;

        // Head.
        let d_logits = exact(&self.logits, n * k)?;
        let features = MatRef::new(&self.features, n, c3)?;
        let d_logits_m = MatRef::new(d_logits, n, k)?;
        matmul(
            sized(&mut g[10], k * c3),
            d_logits_m.t(),
            features,
            false,
            seq,
        )?;
        column_sums(d_logits, k, sized(&mut g[11], k));

        // Convolutions: dW = du^T im2col(input), db = column sums of du.
        for (j, du, cols, rows, c_out, c_in) in [
            (8, &self.a3, &self.cols3, n * t2, c3, 9 * c2),
            (6, &self.a2, &self.cols2, n * t, c2, 9 * c1),
            (4, &self.a1, &self.cols1, n * t, c1, 9 * dim),
        ] {
            let du = exact(du, rows * c_out)?;
            let du_m = MatRef::new(du, rows, c_out)?;
            let cols_m = MatRef::new(cols, rows, c_in)?;
            matmul(sized(&mut g[j], c_out * c_in), du_m.t(), cols_m, false, seq)?;
            column_sums(du, c_out, sized(&mut g[j + 1], c_out));
        }

        // Token map: dM = sum_n dz_n e_n^T, dbm = row sums of dz.
        let (embed_grads, rest) = g.split_at_mut(2);
        let (map_weight, map_bias) = rest.split_at_mut(1);
        let d_map = sized(&mut map_weight[0], t * t);
        let d_map_bias = sized(&mut map_bias[0], t);
        d_map_bias.fill(0.0);
        for img in 0..n {
            let dz = &self.a0[img * t * dim..][..t * dim];
            let e = MatRef::new(&self.embed[img * t * dim..], t, dim)?;
            matmul(d_map, MatRef::new(dz, t, dim)?, e.t(), img > 0, seq)?;
            for (b, row) in d_map_bias.iter_mut().zip(dz.chunks_exact(dim)) {
                *b += row.iter().sum::<f32>();
            }
        }

        // Patch embedding.
        let d_embed = exact(&self.d_embed, n * t * dim)?;
        if d.per_patch {
            let by_pos = sized(&mut self.by_position, t * n * dim);
            for img in 0..n {
                for cell in 0..t {
                    by_pos[(cell * n + img) * dim..][..dim]
                        .copy_from_slice(&d_embed[(img * t + cell) * dim..][..dim]);
                }
            }
            let (dw, db) = embed_grads.split_at_mut(1);
            let dw = sized(&mut dw[0], t * pl * dim);
            let db = sized(&mut db[0], t * dim);
            for cell in 0..t {
                let de = &by_pos[cell * n * dim..][..n * dim];
                let x = MatRef::new(&self.patches[cell * n * pl..], n, pl)?;
                matmul(
                    &mut dw[cell * pl * dim..][..pl * dim],
                    x.t(),
                    MatRef::new(de, n, dim)?,
                    false,
                    seq,
                )?;
                column_sums(de, dim, &mut db[cell * dim..][..dim]);
            }
        } else {
            let de = MatRef::new(d_embed, n * t, dim)?;
            let x = MatRef::new(&self.patches, n * t, pl)?;
            matmul(sized(&mut embed_grads[0], dim * pl), de.t(), x, false, seq)?;
            column_sums(d_embed, dim, sized(&mut embed_grads[1], dim));
        }
        Ok(())
    }
}
