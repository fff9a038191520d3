//! Fused candle ops with hand-written backward kernels, used by the ViT and
//! the CNN: layer norm, softmax, bias add and bias + GELU.
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` have no backward
//! pass, and every autograd node costs candle a zero-filled gradient buffer
//! and an addition (its broadcast-add backward is a slow strided reduction),
//! so fusing these made ViT training about twice as fast on CPU. Each op is
//! checked against candle's composed differentiable formulas in the ViT's
//! tests.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::vit::LAYER_NORM_EPS;
use super::{ColumnSums, f32_operand};

/// Differentiable layer norm over the last dimension of a contiguous `x`
/// (PyTorch semantics, biased variance, eps [`LAYER_NORM_EPS`]) with a
/// fused backward kernel.
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op3(gamma, beta, LayerNormOp)
}

/// Differentiable `softmax(scale * x)` over the last dimension with a fused
/// backward kernel.
pub(crate) fn softmax_last_dim(x: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp { scale })
}

/// Differentiable `x + b` for `b [C]` and `x` whose last dimension is `C`,
/// in one pass; its backward pass sums the gradient's rows for `b` with one
/// fused kernel (candle's broadcast-add backward is a slow strided
/// reduction).
pub(crate) fn add_bias(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(b, BiasAdd)
}

/// Differentiable `gelu(x + b)` (exact, erf-based GELU as PyTorch's
/// `nn.GELU()`) for `b [C]` and `x` whose last dimension is `C`, with a
/// fused backward kernel.
pub(crate) fn bias_gelu(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(b, BiasGelu)
}

/// Sums of the rows of `t` viewed as `[M, C]`, `C` its last dimension.
fn row_sums(t: &Tensor) -> candle_core::Result<Tensor> {
    let c = t.dims().last().copied().unwrap_or(1);
    t.contiguous()?
        .reshape(((), c))?
        .apply_op1_no_bwd(&ColumnSums)
}

/// Applies `f(value, bias)` to every element of `x` (rows of `b.len()`).
pub(crate) fn map_rows_with_bias(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    op: &str,
    f: impl Fn(f32, f32) -> f32,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = f32_operand(s1, l1, op)?;
    let b = f32_operand(s2, l2, op)?;
    let c = b.len();
    if c == 0 || l1.dims().last() != Some(&c) {
        candle_core::bail!("{op}: bias {:?} does not fit {:?}", l2.dims(), l1.dims());
    }
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(c) {
        out.extend(row.iter().zip(b).map(|(&v, &b)| f(v, b)));
    }
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// See [`add_bias`].
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_rows_with_bias(s1, l1, s2, l2, self.name(), |v, b| v + b)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(row_sums(grad)?)))
    }
}

/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `e^x` for `x <= 0` (`0` below about `-87`): `2^n · e^r` with `n` the
/// nearest integer to `x / ln 2` and a degree-6 Taylor polynomial for `e^r`,
/// `|r| <= ln 2 / 2` (relative error below 3e-7, two `f32` steps). Branch-free and without a
/// library call, so loops over slices that use it vectorise (a library `exp`
/// per element was a tenth of the grid CNN's training time).
#[inline(always)]
fn exp_non_positive(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `(Phi(u), phi(u))`, the standard normal distribution function and
/// density, with one `exp`: `Phi(u) = (1 + erf(u / sqrt 2)) / 2` by
/// Abramowitz and Stegun's 7.1.26 (absolute error of `erf` below 1.5e-7,
/// about one `f32` rounding step; no table or branch beyond the sign, so it
/// is several times faster than a library `erf`), and `phi(u) = exp(-u^2 /
/// 2) / sqrt(2 pi)` from the same exponential.
#[inline(always)]
fn normal_cdf_pdf(u: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let x = u.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let e = exp_non_positive(-x * x);
    let t = 1.0 / (1.0 + P * x);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf = 1.0 - poly * e;
    let erf = if u < 0.0 { -erf } else { erf };
    (0.5 * (1.0 + erf), INV_SQRT_2PI * e)
}

/// `gelu(u) = u * Phi(u)` (exact GELU, up to the `erf` approximation of
/// [`normal_cdf_pdf`]).
pub(crate) fn gelu(u: f32) -> f32 {
    u * normal_cdf_pdf(u).0
}

/// `gelu'(u) = Phi(u) + u * phi(u)`.
pub(crate) fn gelu_derivative(u: f32) -> f32 {
    let (cdf, pdf) = normal_cdf_pdf(u);
    cdf + u * pdf
}

/// `(gelu(u), gelu'(u))` with one `exp`.
#[inline(always)]
pub(crate) fn gelu_with_derivative(u: f32) -> (f32, f32) {
    let (cdf, pdf) = normal_cdf_pdf(u);
    (u * cdf, cdf + u * pdf)
}

/// Whether this CPU runs AVX2 and FMA code (checked once, then cached by
/// the standard library).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// `x[i] = gelu(x[i] + bias[i % c])` and `dg[i] = gelu'(x[i] + bias[i %
/// c])` for `x [M, c]`, `c = bias.len()`: the element-wise half of a layer
/// in the hand-written passes. The crates build for baseline x86-64 (SSE2);
/// where the CPU has AVX2 and FMA this loop runs compiled for them, twice
/// as wide (the results are the same: nothing is fused).
pub(crate) fn bias_gelu_in_place(x: &mut [f32], bias: &[f32], dg: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features `bias_gelu_avx2` is compiled for.
        return unsafe { bias_gelu_avx2(x, bias, dg) };
    }
    bias_gelu_body(x, bias, dg);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn bias_gelu_avx2(x: &mut [f32], bias: &[f32], dg: &mut [f32]) {
    bias_gelu_body(x, bias, dg);
}

#[inline(always)]
fn bias_gelu_body(x: &mut [f32], bias: &[f32], dg: &mut [f32]) {
    let c = bias.len();
    for (row, drow) in x.chunks_exact_mut(c).zip(dg.chunks_exact_mut(c)) {
        for ((v, g), b) in row.iter_mut().zip(drow.iter_mut()).zip(bias) {
            (*v, *g) = gelu_with_derivative(*v + b);
        }
    }
}

/// `x[i] = gelu(x[i])` and `dg[i] = gelu'(x[i])`, compiled for AVX2 and
/// FMA where the CPU has them, like [`bias_gelu_in_place`].
pub(crate) fn gelu_in_place(x: &mut [f32], dg: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features `gelu_avx2` is compiled for.
        return unsafe { gelu_avx2(x, dg) };
    }
    gelu_body(x, dg);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_avx2(x: &mut [f32], dg: &mut [f32]) {
    gelu_body(x, dg);
}

#[inline(always)]
fn gelu_body(x: &mut [f32], dg: &mut [f32]) {
    for (v, g) in x.iter_mut().zip(dg.iter_mut()) {
        (*v, *g) = gelu_with_derivative(*v);
    }
}

/// See [`bias_gelu`].
struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_rows_with_bias(s1, l1, s2, l2, self.name(), |v, b| gelu(v + b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x
            .contiguous()?
            .apply_op3_no_bwd(b, &grad.contiguous()?, &BiasGeluBackward)?;
        let db = row_sums(&dx)?;
        Ok((Some(dx), Some(db)))
    }
}

/// Backward of [`BiasGelu`] on `(x, b, grad)`: `grad * gelu'(x + b)`.
struct BiasGeluBackward;

impl CustomOp3 for BiasGeluBackward {
    fn name(&self) -> &'static str {
        "bias-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_operand(s1, l1, self.name())?;
        let b = f32_operand(s2, l2, self.name())?;
        let g = f32_operand(s3, l3, self.name())?;
        let c = b.len();
        if c == 0 || g.len() != x.len() || l1.dims().last() != Some(&c) {
            candle_core::bail!(
                "bias-gelu backward: {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = Vec::with_capacity(x.len());
        for (row, gr) in x.chunks_exact(c).zip(g.chunks_exact(c)) {
            out.extend(
                row.iter()
                    .zip(b)
                    .zip(gr)
                    .map(|((&v, &b), &g)| g * gelu_derivative(v + b)),
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean and reciprocal standard deviation of one row.
fn row_stats(row: &[f32]) -> (f32, f32) {
    let len = row.len() as f32;
    let mean = row.iter().sum::<f32>() / len;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / len;
    (mean, 1.0 / (var + LAYER_NORM_EPS).sqrt())
}

/// Forward layer norm `y = (x - mean) * rstd * gamma + beta` per row.
struct LayerNormOp;

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "vit-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_operand(s1, l1, self.name())?;
        let g = f32_operand(s2, l2, self.name())?;
        let b = f32_operand(s3, l3, self.name())?;
        let c = g.len();
        if c == 0 || b.len() != c || l1.dims().last() != Some(&c) {
            candle_core::bail!(
                "layer norm: {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(c) {
            let (mean, rstd) = row_stats(row);
            out.extend(
                row.iter()
                    .zip(g.iter().zip(b))
                    .map(|(v, (g, b))| (v - mean) * rstd * g + b),
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.dim(0)?;
        let rows = x.elem_count() / c;
        // [rows + 2, C]: d x, then d gamma and d beta.
        let all =
            x.contiguous()?
                .apply_op3_no_bwd(gamma, &grad.contiguous()?, &LayerNormBackward)?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        Ok((Some(dx), Some(all.get(rows)?), Some(all.get(rows + 1)?)))
    }
}

/// Backward of [`LayerNormOp`] on `(x, gamma, grad)`: rows of `d x`, then
/// `d gamma = sum(grad * xhat)` and `d beta = sum(grad)`.
struct LayerNormBackward;

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "vit-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_operand(s1, l1, self.name())?;
        let g = f32_operand(s2, l2, self.name())?;
        let dy = f32_operand(s3, l3, self.name())?;
        let c = g.len();
        if c == 0 || dy.len() != x.len() || !x.len().is_multiple_of(c) {
            candle_core::bail!(
                "layer norm backward: {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let rows = x.len() / c;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, params) = out.split_at_mut(x.len());
        let (dg, db) = params.split_at_mut(c);
        let mut xhat = vec![0f32; c];
        let mut dxhat = vec![0f32; c];
        for ((row, dyr), dxr) in x
            .chunks_exact(c)
            .zip(dy.chunks_exact(c))
            .zip(dx.chunks_exact_mut(c))
        {
            let (mean, rstd) = row_stats(row);
            let (mut sum_d, mut sum_dx) = (0f32, 0f32);
            for j in 0..c {
                xhat[j] = (row[j] - mean) * rstd;
                dxhat[j] = dyr[j] * g[j];
                sum_d += dxhat[j];
                sum_dx += dxhat[j] * xhat[j];
                dg[j] += dyr[j] * xhat[j];
                db[j] += dyr[j];
            }
            let (mean_d, mean_dx) = (sum_d / c as f32, sum_dx / c as f32);
            for j in 0..c {
                dxr[j] = rstd * (dxhat[j] - mean_d - xhat[j] * mean_dx);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, c))))
    }
}

/// `softmax(scale * x)` over the last dimension of a contiguous tensor.
struct SoftmaxOp {
    scale: f32,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "vit-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_operand(s, l, self.name())?;
        let c = l.dims().last().copied().unwrap_or(0);
        if c == 0 {
            candle_core::bail!("softmax: empty last dimension {:?}", l.dims());
        }
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(c) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let start = out.len();
            out.extend(row.iter().map(|v| ((v - max) * self.scale).exp()));
            let inv = 1.0 / out[start..].iter().sum::<f32>();
            for v in &mut out[start..] {
                *v *= inv;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(
            &res.contiguous()?,
            &SoftmaxBackward { scale: self.scale },
        )?))
    }
}

/// Backward of [`SoftmaxOp`] on `(grad, y)`: `scale * y * (grad - sum(grad
/// * y))` per row.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "vit-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_operand(s1, l1, self.name())?;
        let y = f32_operand(s2, l2, self.name())?;
        let c = l1.dims().last().copied().unwrap_or(0);
        if c == 0 || g.len() != y.len() {
            candle_core::bail!("softmax backward: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let mut out = Vec::with_capacity(g.len());
        for (gr, yr) in g.chunks_exact(c).zip(y.chunks_exact(c)) {
            let dot: f32 = gr.iter().zip(yr).map(|(g, y)| g * y).sum();
            out.extend(gr.iter().zip(yr).map(|(g, y)| self.scale * y * (g - dot)));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_non_positive_matches_the_library_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 90.0 / 200_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp_non_positive(x));
            if want > 1e-37 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert!(got < 1e-36, "{x}: {got}");
            }
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_non_positive(0.0), 1.0);
        assert_eq!(exp_non_positive(f32::NEG_INFINITY), exp_non_positive(-87.0));
    }

    use super::*;

    /// Against the library `erf` (candle's port of a high-precision one),
    /// on a dense grid of `[-12, 12]`: GELU within 3e-7 relative to `|u|`
    /// (plus one rounding step), its derivative within 4e-7.
    #[test]
    fn fast_gelu_matches_the_library_erf() {
        let exact_cdf = |u: f64| {
            0.5 * (1.0 + candle_core::cpu::erf::erf_f64(u * std::f64::consts::FRAC_1_SQRT_2))
        };
        let mut worst = (0f64, 0f64);
        for i in -120_000..=120_000 {
            let u = i as f32 * 1e-4;
            let uf = f64::from(u);
            let cdf = exact_cdf(uf);
            let pdf = (-0.5 * uf * uf).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (g, dg) = gelu_with_derivative(u);
            assert_eq!(g, gelu(u));
            assert_eq!(dg, gelu_derivative(u));
            let e = (f64::from(g) - uf * cdf).abs() / (1.0 + uf.abs());
            let de = (f64::from(dg) - (cdf + uf * pdf)).abs();
            worst = (worst.0.max(e), worst.1.max(de));
        }
        assert!(worst.0 < 3e-7 && worst.1 < 4e-7, "worst errors {worst:?}");
    }

    /// The slice loops (AVX2 where the CPU has it) give exactly the scalar
    /// function's values, bias included.
    #[test]
    fn slice_gelu_loops_match_the_scalar_function_exactly() {
        let (rows, c) = (37, 13);
        let x: Vec<f32> = (0..rows * c)
            .map(|i| (i as f32 * 0.37).sin() * 9.0)
            .collect();
        let bias: Vec<f32> = (0..c).map(|j| j as f32 * 0.1 - 0.6).collect();
        let (mut y, mut dg) = (x.clone(), vec![0f32; x.len()]);
        bias_gelu_in_place(&mut y, &bias, &mut dg);
        let (mut z, mut dz) = (x.clone(), vec![0f32; x.len()]);
        gelu_in_place(&mut z, &mut dz);
        for (i, &u) in x.iter().enumerate() {
            let (g, d) = gelu_with_derivative(u + bias[i % c]);
            assert_eq!(
                (y[i].to_bits(), dg[i].to_bits()),
                (g.to_bits(), d.to_bits()),
                "{i}"
            );
            let (g, d) = gelu_with_derivative(u);
            assert_eq!(
                (z[i].to_bits(), dz[i].to_bits()),
                (g.to_bits(), d.to_bits()),
                "{i}"
            );
        }
    }
}
