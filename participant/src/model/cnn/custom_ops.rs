//! The CNN's candle ops with hand-written backward passes: the fused
//! per-channel bias + ReLU and the PyTorch-style 2x2 max-pooling of the
//! differentiable forward pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;
use crate::model::{ReluBackward, f32_operand};

/// Differentiable `relu(x + b[c])` for `x [N, C, H, W]` and `b [C]`, with a
/// fused backward pass (candle's broadcast-add backward is a slow strided
/// reduction over three dimensions).
pub(super) fn channel_bias_relu(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(b, ChannelBiasRelu)
}

/// The `(C, H * W)` of a contiguous `[N, C, H, W]` operand fitting `b [C]`.
fn channel_planes(l: &Layout, c: usize, op: &str) -> candle_core::Result<(usize, usize)> {
    match l.dims() {
        &[_, ch, h, w] if ch == c && c > 0 => Ok((c, h * w)),
        other => candle_core::bail!("{op}: {other:?} does not have {c} channels"),
    }
}

/// See [`channel_bias_relu`].
struct ChannelBiasRelu;

impl CustomOp2 for ChannelBiasRelu {
    fn name(&self) -> &'static str {
        "channel-bias-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_operand(s1, l1, self.name())?;
        let b = f32_operand(s2, l2, self.name())?;
        let (c, plane) = channel_planes(l1, b.len(), self.name())?;
        let mut out = Vec::with_capacity(x.len());
        if plane > 0 {
            for (i, p) in x.chunks_exact(plane).enumerate() {
                let bias = b[i % c];
                out.extend(p.iter().map(|v| (v + bias).max(0.0)));
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op2_no_bwd(res, &ReluBackward)?;
        let db = dx.apply_op1_no_bwd(&ChannelSums)?;
        Ok((Some(dx), Some(db)))
    }
}

/// Per-channel sums of `[N, C, H, W]`, giving `[C]` (bias gradients).
struct ChannelSums;

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_operand(s, l, self.name())?;
        let c = l.dims().get(1).copied().unwrap_or(0);
        let (c, plane) = channel_planes(l, c, self.name())?;
        let mut out = vec![0f32; c];
        if plane > 0 {
            for (i, p) in x.chunks_exact(plane).enumerate() {
                out[i % c] += p.iter().sum::<f32>();
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

/// 2x2 max-pooling with stride 2, dropping an odd last row or column first
/// (PyTorch's floor). `detached` uses candle's `max_pool2d` (inference
/// only); otherwise a maximum over the reshaped windows, whose backward
/// sends each window's gradient to its maximum as PyTorch does (candle
/// 0.11's `max_pool2d` backward scales it by a quarter, see the tests).
pub(crate) fn max_pool_2x2(x: &Tensor, detached: bool) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ph, pw) = (h / 2, w / 2);
    let x = if h % 2 == 1 {
        x.narrow(2, 0, 2 * ph)?
    } else {
        x.clone()
    };
    let x = if w % 2 == 1 {
        x.narrow(3, 0, 2 * pw)?
    } else {
        x
    };
    if detached {
        Ok(x.max_pool2d(2)?)
    } else {
        Ok(x.reshape((n, c, ph, 2, pw, 2))?.max(5)?.max(3)?)
    }
}
