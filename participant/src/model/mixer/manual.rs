//! The Mixer's hand-written training pass (shared patch embedding, CPU):
//! the forward pass keeps what the backward pass needs, and every gradient
//! is computed once, in its final layout, with `gemm` products on plain
//! slices (no autograd graph, no gradient for the images). Checked against
//! candle's autograd in the tests.
//!
//! Per block, with `x [N*T, D]` the residual stream and `ᵀ` the per-image
//! transpose `[T, D] <-> [D, T]`:
//!
//! ```text
//! a  = LN1(x)ᵀ            [N*D, T]
//! u1 = a W1ᵀ + b1         [N*D, S]      h1 = GELU(u1)
//! x += (h1 W2ᵀ + b2)ᵀ     [N*T, D]
//! m  = LN2(x)             [N*T, D]
//! u2 = m W3ᵀ + b3         [N*T, C]      h2 = GELU(u2)
//! x += h2 W4ᵀ + b4
//! ```

use gemm::Parallelism;

use super::MixerDims;
use crate::error::{ParticipantError, Result};
use crate::model::gemm::{MatRef, matmul};
use crate::model::ops;
use crate::model::softmax_cross_entropy_rows;
use crate::model::vit::LAYER_NORM_EPS;

/// What the backward pass needs of one block.
#[derive(Default)]
struct BlockActs {
    /// Normalised input of the token mixing (before its affine), `[N*T, D]`.
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    /// Token-mixing input, per image transposed, `[N*D, T]`.
    a: Vec<f32>,
    /// Token-mixing activation and GELU's derivative at its
    /// pre-activation, `[N*D, S]`.
    h1: Vec<f32>,
    dgelu1: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    /// Channel-mixing input `[N*T, D]`.
    m: Vec<f32>,
    /// Channel-mixing activation and GELU's derivative, `[N*T, C]`.
    h2: Vec<f32>,
    dgelu2: Vec<f32>,
}

/// Mean cross-entropy of the minibatch `images [N, I, R, W]` (contiguous)
/// with `labels [N]`, and the gradients of all parameters (`params` and the
/// result in [`MixerDims::layout`] order, in the layout of the
/// [`Mixer`](super::Mixer)'s variables: a per-position patch embedding
/// weight as `[T, I*P*P, D]`). With `threads > 1` the batch is cut into that many
/// shards (at most one per image), each run on its own thread with
/// single-threaded products, and the results are combined weighted by
/// shard size: element-wise work parallelises too, and the products stay
/// large enough to be efficient.
pub(super) fn loss_and_grads(
    d: &MixerDims,
    params: &[&[f32]],
    images: &[f32],
    labels: &[u32],
    threads: usize,
) -> Result<(f32, Vec<Vec<f32>>)> {
    use rayon::prelude::*;
    let n = labels.len();
    let shards = threads.min(n).max(1);
    if shards == 1 {
        return shard_loss_and_grads(d, params, images, labels);
    }
    let image_len = d.planes * d.rows * d.cols;
    if Some(images.len()) != n.checked_mul(image_len) {
        return Err(ParticipantError::Model(format!(
            "mixer: {n} labels for {} image values",
            images.len()
        )));
    }
    let per = n.div_ceil(shards);
    let parts = labels
        .par_chunks(per)
        .zip(images.par_chunks(per * image_len))
        .map(|(l, x)| Ok((l.len(), shard_loss_and_grads(d, params, x, l)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut loss = 0f32;
    let mut grads: Option<Vec<Vec<f32>>> = None;
    for (len, (l, g)) in parts {
        let w = len as f32 / n as f32;
        loss += w * l;
        match &mut grads {
            None => {
                grads = Some(
                    g.into_iter()
                        .map(|mut v| {
                            v.iter_mut().for_each(|x| *x *= w);
                            v
                        })
                        .collect(),
                )
            }
            Some(acc) => {
                for (a, v) in acc.iter_mut().zip(&g) {
                    for (a, x) in a.iter_mut().zip(v) {
                        *a += w * x;
                    }
                }
            }
        }
    }
    Ok((loss, grads.unwrap_or_default()))
}

/// [`loss_and_grads`] of one shard, on the calling thread.
fn shard_loss_and_grads(
    d: &MixerDims,
    params: &[&[f32]],
    images: &[f32],
    labels: &[u32],
) -> Result<(f32, Vec<Vec<f32>>)> {
    let layout = d.layout();
    let n = labels.len();
    let image_len = d.planes * d.rows * d.cols;
    if n == 0
        || params.len() != layout.len()
        || Some(images.len()) != n.checked_mul(image_len)
        || params.iter().zip(&layout).any(|(p, l)| p.len() != l.len())
    {
        return Err(ParticipantError::Model(format!(
            "mixer: {n} labels, {} image values, {} parameter tensors do not fit the pass",
            images.len(),
            params.len()
        )));
    }
    let par = Parallelism::None;
    let (t, dm, s, c, k, pl) = (
        d.tokens(),
        d.dim,
        d.token_mlp,
        d.channel_mlp,
        d.classes,
        d.patch_len(),
    );
    let rows = n * t;
    let mut grads: Vec<Vec<f32>> = layout.iter().map(|l| vec![0f32; l.len()]).collect();

    // Patch embedding.
    let patches = patch_rows(d, images, n);
    let mut x = vec![0f32; rows * dm];
    // Per patch position: the patches grouped by position, `[T, N, I*P*P]`
    // (empty for a shared embedding).
    let by_pos = if d.per_patch {
        let by_pos = regroup(&patches, n, t, pl);
        // Computed grouped by position in `x`, then regrouped by image.
        for (pos, out) in x.chunks_exact_mut(n * dm).enumerate() {
            let bias = &params[1][pos * dm..(pos + 1) * dm];
            for row in out.chunks_exact_mut(dm) {
                row.copy_from_slice(bias);
            }
            matmul(
                out,
                MatRef::new(&by_pos[pos * n * pl..], n, pl)?,
                MatRef::new(&params[0][pos * pl * dm..], pl, dm)?,
                true,
                par,
            )?;
        }
        x = regroup(&x, t, n, dm);
        by_pos
    } else {
        linear(&mut x, &patches, params[0], params[1], rows, pl, dm, par)?;
        Vec::new()
    };

    let mut acts: Vec<BlockActs> = Vec::with_capacity(d.depth);
    for blk in 0..d.depth {
        let p = |j: usize| params[2 + 12 * blk + j];
        let mut st = BlockActs::default();
        // Token mixing.
        let ln1 = layer_norm(&x, dm, p(0), p(1), &mut st.xhat1, &mut st.rstd1);
        st.a = transpose_tokens(&ln1, n, t, dm);
        st.h1 = vec![0f32; n * dm * s];
        linear(&mut st.h1, &st.a, p(2), p(3), n * dm, t, s, par)?;
        st.dgelu1 = gelu_in_place(&mut st.h1);
        let mut o = vec![0f32; n * dm * t];
        linear(&mut o, &st.h1, p(4), p(5), n * dm, s, t, par)?;
        let o = transpose_channels(&o, n, t, dm);
        add_into(&mut x, &o);
        // Channel mixing.
        st.m = layer_norm(&x, dm, p(6), p(7), &mut st.xhat2, &mut st.rstd2);
        st.h2 = vec![0f32; rows * c];
        linear(&mut st.h2, &st.m, p(8), p(9), rows, dm, c, par)?;
        st.dgelu2 = gelu_in_place(&mut st.h2);
        let mut o = vec![0f32; rows * dm];
        linear(&mut o, &st.h2, p(10), p(11), rows, c, dm, par)?;
        add_into(&mut x, &o);
        acts.push(st);
    }
    let last = 2 + 12 * d.depth;
    let (mut xhatf, mut rstdf) = (Vec::new(), Vec::new());
    let y = layer_norm(
        &x,
        dm,
        params[last],
        params[last + 1],
        &mut xhatf,
        &mut rstdf,
    );
    let mut pooled = vec![0f32; n * dm];
    let inv_t = 1.0 / t as f32;
    for (img, out) in pooled.chunks_exact_mut(dm).enumerate() {
        for row in y[img * t * dm..(img + 1) * t * dm].chunks_exact(dm) {
            add_into(out, row);
        }
        out.iter_mut().for_each(|v| *v *= inv_t);
    }
    let mut logits = vec![0f32; n * k];
    linear(
        &mut logits,
        &pooled,
        params[last + 2],
        params[last + 3],
        n,
        dm,
        k,
        par,
    )?;
    let mut dlogits = vec![0f32; n * k];
    let loss = softmax_cross_entropy_rows(&logits, k, labels, (1.0 / n as f32, 0.0), &mut dlogits)?;

    // Head and final norm.
    let dpooled = linear_backward(
        &dlogits,
        &pooled,
        params[last + 2],
        &mut grads,
        last + 2,
        n,
        dm,
        k,
        par,
    )?;
    let mut dy = vec![0f32; rows * dm];
    for (img, g) in dpooled.chunks_exact(dm).enumerate() {
        for row in dy[img * t * dm..(img + 1) * t * dm].chunks_exact_mut(dm) {
            for (r, &v) in row.iter_mut().zip(g) {
                *r = v * inv_t;
            }
        }
    }
    let mut dx = vec![0f32; rows * dm];
    layer_norm_backward(
        &dy,
        &xhatf,
        &rstdf,
        params[last],
        &mut grads,
        last,
        &mut dx,
        dm,
    );

    for blk in (0..d.depth).rev() {
        let base = 2 + 12 * blk;
        let p = |j: usize| params[base + j];
        let st = &acts[blk];
        // Channel mixing.
        let mut du2 = linear_backward(&dx, &st.h2, p(10), &mut grads, base + 10, rows, c, dm, par)?;
        mul_into(&mut du2, &st.dgelu2);
        let dmid = linear_backward(&du2, &st.m, p(8), &mut grads, base + 8, rows, dm, c, par)?;
        layer_norm_backward(
            &dmid,
            &st.xhat2,
            &st.rstd2,
            p(6),
            &mut grads,
            base + 6,
            &mut dx,
            dm,
        );
        // Token mixing.
        let dot = transpose_tokens(&dx, n, t, dm);
        let mut du1 = linear_backward(&dot, &st.h1, p(4), &mut grads, base + 4, n * dm, s, t, par)?;
        mul_into(&mut du1, &st.dgelu1);
        let da = linear_backward(&du1, &st.a, p(2), &mut grads, base + 2, n * dm, t, s, par)?;
        let da = transpose_channels(&da, n, t, dm);
        layer_norm_backward(
            &da,
            &st.xhat1,
            &st.rstd1,
            p(0),
            &mut grads,
            base,
            &mut dx,
            dm,
        );
    }
    // Patch embedding (no gradient for the images).
    if d.per_patch {
        // Weights kept as `[T, I*P*P, D]`, biases `[T, D]`.
        let dxp = regroup(&dx, n, t, dm);
        for pos in 0..t {
            let g = &dxp[pos * n * dm..(pos + 1) * n * dm];
            matmul(
                &mut grads[0][pos * pl * dm..(pos + 1) * pl * dm],
                MatRef::new(&by_pos[pos * n * pl..], n, pl)?.t(),
                MatRef::new(g, n, dm)?,
                false,
                par,
            )?;
            column_sums(g, dm, &mut grads[1][pos * dm..(pos + 1) * dm]);
        }
    } else {
        matmul(
            &mut grads[0],
            MatRef::new(&dx, rows, dm)?.t(),
            MatRef::new(&patches, rows, pl)?,
            false,
            par,
        )?;
        column_sums(&dx, dm, &mut grads[1]);
    }
    Ok(((loss / n as f64) as f32, grads))
}

/// The patch vectors `[N*T, I*P*P]` of `images`, in the order of
/// [`crate::model::patches::PatchGrid::patches`].
fn patch_rows(d: &MixerDims, images: &[f32], n: usize) -> Vec<f32> {
    let (gr, gc, p, planes) = (d.rows / d.patch, d.cols / d.patch, d.patch, d.planes);
    let (rows, cols) = (d.rows, d.cols);
    let mut out = Vec::with_capacity(images.len());
    for img in 0..n {
        for br in 0..gr {
            for bc in 0..gc {
                for plane in 0..planes {
                    let base = (img * planes + plane) * rows * cols;
                    for r in 0..p {
                        let start = base + (br * p + r) * cols + bc * p;
                        out.extend_from_slice(&images[start..start + p]);
                    }
                }
            }
        }
    }
    out
}

/// `out [rows, o] = x [rows, i] @ w[o, i]ᵀ + b [o]`.
#[allow(clippy::too_many_arguments)]
fn linear(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    i: usize,
    o: usize,
    par: Parallelism,
) -> Result<()> {
    for row in out.chunks_exact_mut(o) {
        row.copy_from_slice(b);
    }
    matmul(
        out,
        MatRef::new(x, rows, i)?,
        MatRef::new(w, o, i)?.t(),
        true,
        par,
    )
}

/// Backward of [`linear`] for `dout [rows, o]`: adds `doutᵀ x` to the weight
/// gradient `grads[at]` and the column sums of `dout` to `grads[at + 1]`;
/// returns `dx = dout @ w`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    grads: &mut [Vec<f32>],
    at: usize,
    rows: usize,
    i: usize,
    o: usize,
    par: Parallelism,
) -> Result<Vec<f32>> {
    matmul(
        &mut grads[at],
        MatRef::new(dout, rows, o)?.t(),
        MatRef::new(x, rows, i)?,
        true,
        par,
    )?;
    column_sums(dout, o, &mut grads[at + 1]);
    let mut dx = vec![0f32; rows * i];
    matmul(
        &mut dx,
        MatRef::new(dout, rows, o)?,
        MatRef::new(w, o, i)?,
        false,
        par,
    )?;
    Ok(dx)
}

/// Adds the column sums of `m [_, cols]` to `out [cols]`.
fn column_sums(m: &[f32], cols: usize, out: &mut [f32]) {
    for row in m.chunks_exact(cols) {
        add_into(out, row);
    }
}

/// Applies GELU to `x` in place; returns its derivative at the old values.
fn gelu_in_place(x: &mut [f32]) -> Vec<f32> {
    let mut dg = vec![0f32; x.len()];
    ops::gelu_in_place(x, &mut dg);
    dg
}

fn mul_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d *= s;
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `[A, B, W] -> [B, A, W]` (rows of width `w`).
fn regroup(x: &[f32], a: usize, b: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for i in 0..a {
        for j in 0..b {
            out[(j * a + i) * w..(j * a + i + 1) * w]
                .copy_from_slice(&x[(i * b + j) * w..(i * b + j + 1) * w]);
        }
    }
    out
}

/// `[N, T, D] -> [N, D, T]`.
fn transpose_tokens(x: &[f32], n: usize, t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for img in 0..n {
        let (src, dst) = (&x[img * t * d..], &mut out[img * t * d..(img + 1) * t * d]);
        for tok in 0..t {
            for ch in 0..d {
                dst[ch * t + tok] = src[tok * d + ch];
            }
        }
    }
    out
}

/// `[N, D, T] -> [N, T, D]`.
fn transpose_channels(x: &[f32], n: usize, t: usize, d: usize) -> Vec<f32> {
    transpose_tokens(x, n, d, t)
}

/// Layer norm of every row of `x [_, d]`: returns `xhat * gamma + beta` and
/// keeps `xhat` and the reciprocal standard deviations.
fn layer_norm(
    x: &[f32],
    d: usize,
    gamma: &[f32],
    beta: &[f32],
    xhat: &mut Vec<f32>,
    rstd: &mut Vec<f32>,
) -> Vec<f32> {
    xhat.clear();
    rstd.clear();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let r = 1.0 / (var + LAYER_NORM_EPS).sqrt();
        rstd.push(r);
        for ((&v, &g), &b) in row.iter().zip(gamma).zip(beta) {
            let h = (v - mean) * r;
            xhat.push(h);
            out.push(h * g + b);
        }
    }
    out
}

/// Backward of [`layer_norm`] for `dy`: adds the gamma and beta gradients
/// to `grads[at]` and `grads[at + 1]` and the input gradient to `dx`.
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    grads: &mut [Vec<f32>],
    at: usize,
    dx: &mut [f32],
    d: usize,
) {
    let (dgamma, rest) = grads[at..].split_at_mut(1);
    let (dgamma, dbeta) = (&mut dgamma[0], &mut rest[0]);
    let inv_d = 1.0 / d as f32;
    for (((g, h), &r), out) in dy
        .chunks_exact(d)
        .zip(xhat.chunks_exact(d))
        .zip(rstd)
        .zip(dx.chunks_exact_mut(d))
    {
        let mut sum = 0f32;
        let mut sum_h = 0f32;
        for j in 0..d {
            dgamma[j] += g[j] * h[j];
            dbeta[j] += g[j];
            let gh = g[j] * gamma[j];
            sum += gh;
            sum_h += gh * h[j];
        }
        for j in 0..d {
            let gh = g[j] * gamma[j];
            out[j] += r * (gh - inv_d * (sum + h[j] * sum_h));
        }
    }
}
