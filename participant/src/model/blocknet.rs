//! [`BlockNet`], the block-wise network, and its hand-written backward pass.
//!
//! [`BlockNet`] is a convolution with kernel = stride = block size `B`
//! (one `C`-vector per image block), ReLU, a hidden linear layer of `H` units
//! with ReLU, and a linear classifier. The convolution is computed without a
//! convolution op: the image `[N, 1, R, W]` is reshaped into its
//! non-overlapping `B x B` patches `[N * P, B * B]` (`P = (R/B) * (W/B)`),
//! multiplied once by the kernel matrix `[C, B * B]^T`, biased and rectified.
//! PyTorch feeds `fc1` the conv output `[N, C, R/B, W/B]` flattened
//! channel-major (`x.flatten(1)`); instead of transposing activations every
//! step (forward and backward), `fc1`'s weight is re-laid out once when a
//! network is built (inputs in block-major order; see [`BlockNet`]) and back
//! in `to_weights`, so the patch-matmul output `[N * P, C]` *is* `fc1`'s
//! input `[N, P * C]`. The network computes exactly PyTorch's function.
//!
//! Why block-wise image encryption costs this architecture nothing is in the
//! [parent module's docs](super).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Shape, Tensor, Var};
use greyfed_protocol::message::{FirstLayer, ModelSpec};
use greyfed_protocol::weights::ModelWeights;

use super::conv::column_sums;
use super::gemm::{MatRef, product_grad_norm_sq, sum_of_squares};
use super::ops::map_rows_with_bias;
use super::{
    ClippedGradSum, LossAndGrads, MAX_PARAMETERS, Model, ParamInfo, check_clip_batch, check_layout,
    check_positive, clip_factor, f32_operand, softmax_cross_entropy_rows, var_from,
    vars_to_weights,
};
use crate::error::{ParticipantError, Result};

/// The validated dimensions of a [`ModelSpec::BlockNet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockNetDims {
    /// Image height `R`.
    pub rows: usize,
    /// Image width `W`.
    pub cols: usize,
    /// Image planes `I` (1 grey-scale, 2 split halves).
    pub planes: usize,
    /// A separate conv kernel for every block position.
    pub per_block: bool,
    /// Block edge `B`.
    pub block: usize,
    /// Conv output channels `C`.
    pub channels: usize,
    /// Hidden width `H`.
    pub hidden: usize,
    /// Number of classes `K`.
    pub classes: usize,
}

impl BlockNetDims {
    /// Extracts and validates the dimensions: all positive, `B` divides `R`
    /// and `W`, at most [`MAX_PARAMETERS`] parameters.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        let ModelSpec::BlockNet {
            image_rows,
            image_cols,
            image_channels,
            block_size,
            first_layer,
            channels,
            hidden,
            num_classes,
        } = spec
        else {
            return Err(ParticipantError::Model(format!(
                "model {:?} is not a blocknet",
                spec.name()
            )));
        };
        let dims = Self {
            rows: *image_rows as usize,
            cols: *image_cols as usize,
            planes: *image_channels as usize,
            block: *block_size as usize,
            per_block: *first_layer == FirstLayer::PerBlock,
            channels: *channels as usize,
            hidden: *hidden as usize,
            classes: *num_classes as usize,
        };
        check_positive(
            "blocknet",
            &[
                ("image rows", dims.rows),
                ("image cols", dims.cols),
                ("image channels", dims.planes),
                ("block size", dims.block),
                ("channels", dims.channels),
                ("hidden", dims.hidden),
                ("num classes", dims.classes),
            ],
        )?;
        if !dims.rows.is_multiple_of(dims.block) || !dims.cols.is_multiple_of(dims.block) {
            return Err(ParticipantError::Model(format!(
                "blocknet: block size {} does not divide the image size {}x{}",
                dims.block, dims.rows, dims.cols
            )));
        }
        let count = [
            dims.channels
                .checked_mul(dims.patch_len() + 1)
                .and_then(|v| v.checked_mul(if dims.per_block { dims.blocks() } else { 1 })),
            dims.fc1_in()
                .checked_add(1)
                .and_then(|v| v.checked_mul(dims.hidden)),
            (dims.hidden + 1).checked_mul(dims.classes),
        ]
        .into_iter()
        .try_fold(0usize, |acc, v| v.and_then(|v| acc.checked_add(v)));
        match count {
            Some(n) if n <= MAX_PARAMETERS => Ok(dims),
            _ => Err(ParticipantError::Model(format!(
                "blocknet: more than {MAX_PARAMETERS} parameters"
            ))),
        }
    }

    /// Blocks per image column (`R / B`).
    pub fn grid_rows(&self) -> usize {
        self.rows / self.block
    }

    /// Blocks per image row (`W / B`).
    pub fn grid_cols(&self) -> usize {
        self.cols / self.block
    }

    /// Blocks per image `P`.
    pub fn blocks(&self) -> usize {
        self.grid_rows() * self.grid_cols()
    }

    /// Inputs of `fc1`: `C * P` (saturating, checked in `from_spec`).
    pub fn fc1_in(&self) -> usize {
        self.channels.saturating_mul(self.blocks())
    }

    /// Values per patch `I * B * B` (the conv kernel's fan-in).
    pub fn patch_len(&self) -> usize {
        self.planes.saturating_mul(self.block * self.block)
    }

    /// The parameter tensors, in order.
    pub fn layout(&self) -> Vec<ParamInfo> {
        let (b, c, h, k) = (self.block, self.channels, self.hidden, self.classes);
        let (f, pl) = (self.fc1_in(), self.patch_len());
        let (conv_w, conv_b) = if self.per_block {
            let p = self.blocks();
            (vec![p, c, self.planes, b, b], vec![p, c])
        } else {
            (vec![c, self.planes, b, b], vec![c])
        };
        vec![
            ParamInfo::new("conv.weight", conv_w, pl),
            ParamInfo::new("conv.bias", conv_b, pl),
            ParamInfo::new("fc1.weight", vec![h, f], f),
            ParamInfo::new("fc1.bias", vec![h], f),
            ParamInfo::new("fc2.weight", vec![k, h], h),
            ParamInfo::new("fc2.bias", vec![k], h),
        ]
    }
}

/// The block-wise network (see the module docs).
///
/// Internal layout: the conv kernel is the matrix `[C, B * B]` it is used as
/// (same values as `conv.weight`), and `fc1`'s weight is stored transposed,
/// `[P * C, H]`, with its inputs in block-major order (row `p * C + c` holds
/// PyTorch's column `c * P + p`). The conv output `[N * P, C]` is then fc1's
/// input `[N, P * C]` by a mere reshape, in the forward and in the backward
/// pass, and all three fc1 matmuls run on contiguous operands (a transposed
/// right-hand side made candle's multi-threaded matmul much slower). The
/// re-layout is applied once when building the network and undone in
/// [`BlockNet::to_weights`]; [`ModelWeights`] always has PyTorch's layout.
///
/// Training uses a hand-written backward pass ([`BlockNet::loss_and_grads`]):
/// a handful of matmuls and fused element-wise kernels, each gradient
/// computed once directly in its final layout, and none for the images.
#[derive(Debug)]
pub struct BlockNet {
    dims: BlockNetDims,
    conv_w: Var,
    conv_b: Var,
    fc1_w: Var,
    fc1_b: Var,
    fc2_w: Var,
    fc2_b: Var,
}

/// Gradients of the loss with respect to the layers' outputs before their
/// bias and activation: logits `[N, K]`, hidden `[N, H]`, conv `[N * P, C]`.
struct Signals {
    d_logits: Tensor,
    d_hidden: Tensor,
    d_conv: Tensor,
}

/// Intermediate values of a blocknet forward pass kept for the backward pass.
struct BlockActs {
    patches: Tensor,
    conv: Tensor,
    flat: Tensor,
    hidden: Tensor,
    logits: Tensor,
}

impl BlockNet {
    /// Builds a blocknet for `spec` from `weights` (checked against the
    /// spec's layout) on `device`.
    pub fn new(spec: &ModelSpec, weights: &ModelWeights, device: &Device) -> Result<Self> {
        let dims = BlockNetDims::from_spec(spec)?;
        check_layout(&dims.layout(), weights, "blocknet")?;
        let t = weights.tensors();
        Ok(Self {
            dims,
            conv_w: if dims.per_block {
                var_from(
                    &t[0],
                    &[dims.blocks(), dims.channels, dims.patch_len()],
                    device,
                )?
            } else {
                var_from(&t[0], &[dims.channels, dims.patch_len()], device)?
            },
            conv_b: var_from(&t[1], &t[1].shape, device)?,
            fc1_w: Var::from_vec(
                fc1_to_internal(&t[2].data, dims.hidden, dims.channels, dims.blocks()),
                (dims.fc1_in(), dims.hidden),
                device,
            )?,
            fc1_b: var_from(&t[3], &t[3].shape, device)?,
            fc2_w: var_from(&t[4], &t[4].shape, device)?,
            fc2_b: var_from(&t[5], &t[5].shape, device)?,
        })
    }

    /// The validated dimensions.
    pub fn dims(&self) -> &BlockNetDims {
        &self.dims
    }

    /// The variables in [`ModelWeights`] order, in the internal layout
    /// (see [`BlockNet`]).
    pub fn vars(&self) -> Vec<Var> {
        vec![
            self.conv_w.clone(),
            self.conv_b.clone(),
            self.fc1_w.clone(),
            self.fc1_b.clone(),
            self.fc2_w.clone(),
            self.fc2_b.clone(),
        ]
    }

    /// Checks the input shape, returning the batch size.
    fn batch_size(&self, images: &Tensor) -> Result<usize> {
        let d = &self.dims;
        match images.dims() {
            &[n, i, r, w] if i == d.planes && r == d.rows && w == d.cols => Ok(n),
            other => Err(ParticipantError::Model(format!(
                "blocknet expects images [N, {}, {}, {}], got {other:?}",
                d.planes, d.rows, d.cols
            ))),
        }
    }

    /// `[N, I, R, W] -> [N, I, R/B, B, W/B, B] -> [N, R/B, W/B, I, B, B] ->
    /// [N * P, I * B * B]` (for `I = 1` a 5-d permute, which candle copies faster).
    fn patches(&self, images: &Tensor, n: usize) -> Result<Tensor> {
        let d = &self.dims;
        let (gr, gc, b) = (d.grid_rows(), d.grid_cols(), d.block);
        let grouped = if d.planes == 1 {
            images
                .reshape((n, gr, b, gc, b))?
                .permute((0, 1, 3, 2, 4))?
        } else {
            images
                .reshape((n, d.planes, gr, b, gc, b))?
                .permute((0, 2, 4, 1, 3, 5))?
        };
        Ok(grouped.reshape((n * d.blocks(), d.patch_len()))?)
    }

    /// Conv output `[N * P, C]` to fc1 input `[N, P * C]` (block-major, to
    /// match the internal column order of fc1's weight).
    fn flatten(&self, conv: &Tensor, n: usize) -> Result<Tensor> {
        Ok(conv.reshape((n, self.dims.fc1_in()))?)
    }

    /// The convolution before its bias: `[N * P, C]` for a shared kernel
    /// (one matmul for all blocks of all images), `[N, P * C]` per block (one
    /// batched matmul over block positions). `patches` is `[N * P, I*B*B]`
    /// (shared) or `[P, N, I*B*B]` (per block, see [`BlockNet::patch_batches`]);
    /// either way the flattened conv bias (`[C]` or `[P * C]`) fits its rows.
    fn conv_pre_bias(&self, patches: &Tensor, weight: &Tensor, n: usize) -> Result<Tensor> {
        let d = &self.dims;
        if d.per_block {
            Ok(patches
                .matmul(&weight.transpose(1, 2)?)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n, d.fc1_in()))?)
        } else {
            Ok(patches.matmul(&weight.t()?)?)
        }
    }

    /// Patches as the conv stage takes them: `[N * P, I*B*B]`, or per block
    /// position `[P, N, I*B*B]`.
    fn patch_batches(&self, images: &Tensor, n: usize) -> Result<Tensor> {
        let patches = self.patches(images, n)?;
        let d = &self.dims;
        if d.per_block {
            Ok(patches
                .reshape((n, d.blocks(), d.patch_len()))?
                .transpose(0, 1)?
                .contiguous()?)
        } else {
            Ok(patches)
        }
    }

    /// Differentiable logits `[N, K]` for images `[N, I, R, W]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let n = self.batch_size(images)?;
        let pre =
            self.conv_pre_bias(&self.patch_batches(images, n)?, self.conv_w.as_tensor(), n)?;
        let conv = pre.broadcast_add(&self.conv_b.flatten_all()?)?.relu()?;
        let hidden = self
            .flatten(&conv, n)?
            .matmul(&self.fc1_w)?
            .broadcast_add(&self.fc1_b)?
            .relu()?;
        Ok(hidden
            .matmul(&self.fc2_w.t()?)?
            .broadcast_add(&self.fc2_b)?)
    }

    /// Forward pass on detached tensors with fused bias + ReLU kernels.
    fn forward_acts(&self, images: &Tensor) -> Result<BlockActs> {
        let n = self.batch_size(images)?;
        let det = |v: &Var| v.as_detached_tensor();
        let patches = self.patch_batches(&images.detach(), n)?;
        let flat = self
            .conv_pre_bias(&patches, &det(&self.conv_w), n)?
            .apply_op2_no_bwd(&det(&self.conv_b).flatten_all()?, &BiasAct { relu: true })?;
        let flat = self.flatten(&flat, n)?;
        let conv = flat.reshape((n * self.dims.blocks(), self.dims.channels))?;
        let hidden = flat
            .matmul(&det(&self.fc1_w))?
            .apply_op2_no_bwd(&det(&self.fc1_b), &BiasAct { relu: true })?;
        let logits = hidden
            .matmul(&det(&self.fc2_w).t()?)?
            .apply_op2_no_bwd(&det(&self.fc2_b), &BiasAct { relu: false })?;
        Ok(BlockActs {
            patches,
            conv,
            flat,
            hidden,
            logits,
        })
    }

    /// Inference-only logits `[N, K]` (no autograd graph).
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.forward_acts(images)?.logits)
    }

    /// Mean cross-entropy of a minibatch and the gradients of all variables,
    /// by a hand-written backward pass (no gradient for the images).
    pub fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        let a = self.forward_acts(images)?;
        let (loss, d_logits) = softmax_cross_entropy(&a.logits, labels)?;
        let s = self.signals(&a, d_logits)?;
        Ok(LossAndGrads {
            loss,
            grads: self.weight_grads(&a, &s)?,
        })
    }

    /// [`Model::clipped_grad_sum`] in one batched pass: the backward signals
    /// of each example's own loss, each example's gradient norm from them
    /// without forming the per-example gradients (for a product `y = x W`
    /// the gradient `dy^T x` of one example has norm `|dy| |x|`, summed
    /// over the block positions' terms for the convolution), then every
    /// example's signals scaled by its clip factor and the weight gradients
    /// formed once for the batch.
    pub fn clipped_grad_sum(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        clip: f32,
    ) -> Result<ClippedGradSum> {
        let d = &self.dims;
        let n = check_clip_batch(images, labels, clip)?;
        let a = self.forward_acts(images)?;
        let k = d.classes;
        let z = a.logits.flatten_all()?.to_vec1::<f32>()?;
        let y = labels.to_vec1::<u32>()?;
        let mut grad = vec![0f32; n * k];
        let loss_sum = softmax_cross_entropy_rows(&z, k, &y, (1.0, smoothing), &mut grad)?;
        let s = self.signals(&a, Tensor::from_vec(grad, (n, k), a.logits.device())?)?;
        // Per-example sums of squares of a tensor's rows [n, ...].
        let rows = |t: &Tensor| -> Result<Vec<f64>> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.chunks_exact(v.len() / n.max(1))
                .map(sum_of_squares)
                .collect())
        };
        let (d_logits2, d_hidden2) = (rows(&s.d_logits)?, rows(&s.d_hidden)?);
        let (hidden2, flat2) = (rows(&a.hidden)?, rows(&a.flat)?);
        // fc2 and fc1: weight |dy|^2 |x|^2, bias |dy|^2.
        let mut squares: Vec<f64> = (0..n)
            .map(|i| d_logits2[i] * (hidden2[i] + 1.0) + d_hidden2[i] * (flat2[i] + 1.0))
            .collect();
        let (p, c, l) = (d.blocks(), d.channels, d.patch_len());
        let d_conv = s.d_conv.flatten_all()?.to_vec1::<f32>()?;
        let patches = a.patches.flatten_all()?.to_vec1::<f32>()?;
        if d.per_block {
            // One kernel per position: each (example, position) term is a
            // product's gradient of its own. Patches are [P, n, L].
            for (i, sq) in squares.iter_mut().enumerate() {
                for pos in 0..p {
                    let dc = sum_of_squares(&d_conv[(i * p + pos) * c..][..c]);
                    let x = sum_of_squares(&patches[(pos * n + i) * l..][..l]);
                    *sq += dc * (x + 1.0);
                }
            }
        } else {
            let (mut bias, mut scratch) = (vec![0f32; c], Vec::new());
            for (i, sq) in squares.iter_mut().enumerate() {
                let dc = &d_conv[i * p * c..][..p * c];
                let x = MatRef::new(&patches[i * p * l..], p, l)?;
                *sq += product_grad_norm_sq(MatRef::new(dc, p, c)?, x, &mut scratch)?;
                column_sums(dc, c, &mut bias);
                *sq += sum_of_squares(&bias);
            }
        }
        let norms: Vec<f32> = squares.iter().map(|&q| q.sqrt() as f32).collect();
        let factors: Vec<f32> = norms
            .iter()
            .map(|&g| clip_factor(f64::from(g), f64::from(clip)) as f32)
            .collect();
        let factors = Tensor::from_vec(factors, (n, 1), a.logits.device())?;
        let scale = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, ()))?
                .broadcast_mul(&factors)?
                .reshape(t.dims())?)
        };
        let scaled = Signals {
            d_logits: scale(&s.d_logits)?,
            d_hidden: scale(&s.d_hidden)?,
            d_conv: scale(&s.d_conv)?,
        };
        Ok(ClippedGradSum {
            loss_sum,
            grads: self.weight_grads(&a, &scaled)?,
            norms,
        })
    }

    /// The backward signals (gradients of the layers' pre-activations) for
    /// the loss gradient `d_logits [N, K]`.
    fn signals(&self, a: &BlockActs, d_logits: Tensor) -> Result<Signals> {
        let d = &self.dims;
        let n = a.logits.dim(0)?;
        let w1 = self.fc1_w.as_detached_tensor();
        let w2 = self.fc2_w.as_detached_tensor();
        let d_hidden = d_logits
            .matmul(&w2)?
            .apply_op2_no_bwd(&a.hidden, &ReluBackward)?;
        // d flat [N, P * C] is d conv [N * P, C].
        let d_conv = d_hidden
            .matmul(&w1.t()?)?
            .reshape((n * d.blocks(), d.channels))?
            .apply_op2_no_bwd(&a.conv, &ReluBackward)?;
        Ok(Signals {
            d_logits,
            d_hidden,
            d_conv,
        })
    }

    /// The weight gradients, summed over the batch, from the signals.
    fn weight_grads(&self, a: &BlockActs, s: &Signals) -> Result<Vec<Tensor>> {
        let d = &self.dims;
        let n = a.logits.dim(0)?;
        // fc2: logits = hidden @ W2^T + b2.
        let d_w2 = s.d_logits.t()?.matmul(&a.hidden)?;
        let d_b2 = s.d_logits.apply_op1_no_bwd(&ColumnSums)?;
        // fc1: hidden = relu(flat @ W1t + b1), W1t the internal [P * C, H].
        let d_w1 = a.flat.t()?.matmul(&s.d_hidden)?;
        let d_b1 = s.d_hidden.apply_op1_no_bwd(&ColumnSums)?;
        // conv: conv = relu(patches @ Wc^T + bc), per block position when
        // the kernels are per block.
        let (d_wc, d_bc) = if d.per_block {
            let d_pre = s.d_conv.reshape((n, d.fc1_in()))?;
            let by_block = d_pre
                .reshape((n, d.blocks(), d.channels))?
                .transpose(0, 1)?
                .contiguous()?;
            (
                by_block.transpose(1, 2)?.matmul(&a.patches)?,
                d_pre
                    .apply_op1_no_bwd(&ColumnSums)?
                    .reshape((d.blocks(), d.channels))?,
            )
        } else {
            (
                s.d_conv.t()?.matmul(&a.patches)?,
                s.d_conv.apply_op1_no_bwd(&ColumnSums)?,
            )
        };
        Ok(vec![d_wc, d_bc, d_w1, d_b1, d_w2, d_b2])
    }

    /// The current values as [`ModelWeights`] (PyTorch layout).
    pub fn to_weights(&self) -> Result<ModelWeights> {
        let d = &self.dims;
        let mut tensors = vars_to_weights(&d.layout(), &self.vars())?.into_tensors();
        tensors[2].data = fc1_from_internal(&tensors[2].data, d.hidden, d.channels, d.blocks());
        Ok(ModelWeights::new(tensors)?)
    }
}

impl Model for BlockNet {
    fn vars(&self) -> Vec<Var> {
        BlockNet::vars(self)
    }

    fn layout(&self) -> Vec<ParamInfo> {
        self.dims().layout()
    }

    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        BlockNet::forward(self, images)
    }

    fn predict(&self, images: &Tensor) -> Result<Tensor> {
        BlockNet::predict(self, images)
    }

    fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        BlockNet::loss_and_grads(self, images, labels)
    }

    fn clipped_grad_sum(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        clip: f32,
    ) -> Result<ClippedGradSum> {
        BlockNet::clipped_grad_sum(self, images, labels, smoothing, clip)
    }

    fn to_weights(&self) -> Result<ModelWeights> {
        BlockNet::to_weights(self)
    }
}

/// Rows of `H` the fc1 layout changes move together, in 4 x 4 blocks
/// transposed in registers: each internal row gets 16 contiguous values (a
/// cache line) at a time. Every local training and every evaluation in a
/// sum of its own builds a network, and value-by-value moves had cost
/// about a third of an evaluation (`cargo bench -p greyfed-participant
/// --bench train -- evaluate`).
const FC1_TILE: usize = 16;

/// The transpose of a 4 x 4 block (SSE shuffles on x86-64).
#[inline(always)]
fn transpose4(m: [[f32; 4]; 4]) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_loadu_ps, _mm_movehl_ps, _mm_movelh_ps, _mm_storeu_ps, _mm_unpackhi_ps,
            _mm_unpacklo_ps,
        };
        // SAFETY: SSE is part of x86-64; every load and store is of a whole
        // `[f32; 4]` (unaligned accesses).
        unsafe {
            let [a, b, c, d] = m.map(|row| _mm_loadu_ps(row.as_ptr()));
            let (ab_lo, cd_lo) = (_mm_unpacklo_ps(a, b), _mm_unpacklo_ps(c, d));
            let (ab_hi, cd_hi) = (_mm_unpackhi_ps(a, b), _mm_unpackhi_ps(c, d));
            let columns = [
                _mm_movelh_ps(ab_lo, cd_lo),
                _mm_movehl_ps(cd_lo, ab_lo),
                _mm_movelh_ps(ab_hi, cd_hi),
                _mm_movehl_ps(cd_hi, ab_hi),
            ];
            let mut out = [[0f32; 4]; 4];
            for (o, col) in out.iter_mut().zip(columns) {
                _mm_storeu_ps(o.as_mut_ptr(), col);
            }
            out
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::array::from_fn(|j| std::array::from_fn(|k| m[k][j]))
    }
}

/// The 4 values of `w` from `at`.
#[inline(always)]
fn run_of(w: &[f32], at: usize) -> [f32; 4] {
    w[at..at + 4].try_into().expect("4 values")
}

/// Internal fc1 row of each PyTorch column `c * P + p`: `p * C + c`.
fn fc1_rows(c: usize, p: usize) -> Vec<usize> {
    (0..c * p).map(|col| (col % p) * c + col / p).collect()
}

/// fc1 weight from PyTorch's `[H, C * P]` (column `c * P + p`) to the
/// internal `[P * C, H]` (row `p * C + c`).
fn fc1_to_internal(w: &[f32], h: usize, c: usize, p: usize) -> Vec<f32> {
    fc1_relayout::<true>(w, h, c, p)
}

/// Inverse of [`fc1_to_internal`].
fn fc1_from_internal(w: &[f32], h: usize, c: usize, p: usize) -> Vec<f32> {
    fc1_relayout::<false>(w, h, c, p)
}

/// Moves the value at `(hh, col)` (row `hh` of `H`, PyTorch column `col`)
/// from PyTorch's place, `hh * C * P + col`, to the internal one,
/// `row_of[col] * H + hh` (`TO_INTERNAL`), or back. Runs of 4 are
/// contiguous along `col` in PyTorch's layout and along `hh` in the internal
/// one, so each 4 x 4 block is read as 4 runs of one layout, transposed, and
/// written as 4 runs of the other.
fn fc1_relayout<const TO_INTERNAL: bool>(w: &[f32], h: usize, c: usize, p: usize) -> Vec<f32> {
    let cp = c * p;
    let row_of = fc1_rows(c, p);
    let pytorch = |hh: usize, col: usize| hh * cp + col;
    let internal = |hh: usize, col: usize| row_of[col] * h + hh;
    let mut out = vec![0f32; w.len()];
    let (ht, cp4) = (h - h % FC1_TILE, cp - cp % 4);
    // Whole tiles: for 4 columns at a time, 16 values of each.
    for h0 in (0..ht).step_by(FC1_TILE) {
        for col0 in (0..cp4).step_by(4) {
            for q in (h0..h0 + FC1_TILE).step_by(4) {
                let block = std::array::from_fn(|i| match TO_INTERNAL {
                    true => run_of(w, pytorch(q + i, col0)),
                    false => run_of(w, internal(q, col0 + i)),
                });
                for (i, run) in transpose4(block).into_iter().enumerate() {
                    let at = match TO_INTERNAL {
                        true => internal(q, col0 + i),
                        false => pytorch(q + i, col0),
                    };
                    out[at..at + 4].copy_from_slice(&run);
                }
            }
        }
    }
    // The edges, value by value.
    for hh in 0..h {
        let cols = if hh < ht { cp4..cp } else { 0..cp };
        for col in cols {
            let (from, to) = match TO_INTERNAL {
                true => (pytorch(hh, col), internal(hh, col)),
                false => (internal(hh, col), pytorch(hh, col)),
            };
            out[to] = w[from];
        }
    }
    out
}

/// Mean softmax cross-entropy of `logits [N, K]` against `labels u32 [N]` and
/// its gradient with respect to the logits, `(softmax - onehot) / N`.
fn softmax_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(f32, Tensor)> {
    let (n, k) = logits.dims2()?;
    let z = logits.flatten_all()?.to_vec1::<f32>()?;
    let y = labels.to_vec1::<u32>()?;
    if y.len() != n || n == 0 {
        return Err(ParticipantError::Model(format!(
            "{} labels for {n} logits",
            y.len()
        )));
    }
    let mut grad = vec![0f32; n * k];
    let loss = softmax_cross_entropy_rows(&z, k, &y, (1.0 / n as f32, 0.0), &mut grad)?;
    let grad = Tensor::from_vec(grad, (n, k), logits.device())?;
    Ok(((loss / n as f64) as f32, grad))
}

/// `x [M, C] + b [C]`, optionally followed by ReLU, in one pass (no autograd).
struct BiasAct {
    relu: bool,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if self.relu {
            map_rows_with_bias(s1, l1, s2, l2, self.name(), |v, b| (v + b).max(0.0))
        } else {
            map_rows_with_bias(s1, l1, s2, l2, self.name(), |v, b| v + b)
        }
    }
}

/// Sums over the rows of a matrix `[M, C]`, giving `[C]` (bias gradients).
pub(crate) struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_operand(s, l, self.name())?;
        let (_, c) = l.shape().dims2()?;
        let mut out = vec![0f32; c];
        if c > 0 {
            for row in x.chunks_exact(c) {
                for (o, v) in out.iter_mut().zip(row) {
                    *o += v;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

/// Gradient through a ReLU: `grad` where the ReLU's output is positive, else 0.
pub(crate) struct ReluBackward;

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_operand(s1, l1, self.name())?;
        let a = f32_operand(s2, l2, self.name())?;
        if g.len() != a.len() {
            candle_core::bail!("relu-backward: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let out = g
            .iter()
            .zip(a)
            .map(|(&g, &a)| if a > 0.0 { g } else { 0.0 })
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::super::{Network, autograd_loss_and_grads, init_weights};
    use super::*;

    /// The tiled layout changes move every value where the definition
    /// says, in whole tiles and at edges narrower than a tile or a block in
    /// either direction, and undo each other.
    #[test]
    fn fc1_layout_changes_follow_their_definition() {
        for (h, c, p) in [
            (37, 3, 5),
            (16, 2, 49),
            (1, 1, 1),
            (128, 16, 49),
            (35, 2, 7),
        ] {
            let w: Vec<f32> = (0..h * c * p).map(|i| i as f32).collect();
            let internal = fc1_to_internal(&w, h, c, p);
            for hi in 0..h {
                for ci in 0..c {
                    for pi in 0..p {
                        assert_eq!(
                            internal[(pi * c + ci) * h + hi],
                            w[hi * c * p + ci * p + pi],
                            "h {h}, c {c}, p {p}: ({hi}, {ci}, {pi})"
                        );
                    }
                }
            }
            assert_eq!(fc1_from_internal(&internal, h, c, p), w);
        }
    }

    /// Plain-loop reference of the blocknet forward pass for one image.
    fn reference_logits(d: &BlockNetDims, w: &ModelWeights, img: &[f32]) -> Vec<f32> {
        let get = |n: &str| &w.get(n).unwrap().data;
        let (cw, cb, w1, b1, w2, b2) = (
            get("conv.weight"),
            get("conv.bias"),
            get("fc1.weight"),
            get("fc1.bias"),
            get("fc2.weight"),
            get("fc2.bias"),
        );
        let (b, gr, gc) = (d.block, d.grid_rows(), d.grid_cols());
        // conv output [C, R/B, W/B], flattened in that order.
        let mut conv = vec![0f32; d.channels * gr * gc];
        for c in 0..d.channels {
            for by in 0..gr {
                for bx in 0..gc {
                    // Per-block kernels: weight [P, C, 1, B, B], bias [P, C].
                    let k = if d.per_block {
                        (by * gc + bx) * d.channels + c
                    } else {
                        c
                    };
                    let mut s = cb[k];
                    for i in 0..b {
                        for j in 0..b {
                            s += cw[(k * b + i) * b + j] * img[(by * b + i) * d.cols + bx * b + j];
                        }
                    }
                    conv[(c * gr + by) * gc + bx] = s.max(0.0);
                }
            }
        }
        let f = conv.len();
        let hidden: Vec<f32> = (0..d.hidden)
            .map(|h| {
                let s: f32 = (0..f).map(|i| w1[h * f + i] * conv[i]).sum();
                (s + b1[h]).max(0.0)
            })
            .collect();
        (0..d.classes)
            .map(|k| {
                let s: f32 = (0..d.hidden)
                    .map(|h| w2[k * d.hidden + h] * hidden[h])
                    .sum();
                s + b2[k]
            })
            .collect()
    }

    /// A small blocknet for the forward and backward tests.
    fn test_spec(first_layer: FirstLayer) -> ModelSpec {
        ModelSpec::BlockNet {
            image_rows: 8,
            image_cols: 12,
            image_channels: 1,
            block_size: 4,
            first_layer,
            channels: 6,
            hidden: 7,
            num_classes: 5,
        }
    }

    #[test]
    fn forward_matches_naive_reference() {
        for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
            forward_matches_naive_reference_for(test_spec(layer));
        }
    }

    fn forward_matches_naive_reference_for(spec: ModelSpec) {
        let d = BlockNetDims::from_spec(&spec).unwrap();
        let w = init_weights(&spec, 11).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let n = 3;
        let images: Vec<f32> = (0..n * d.rows * d.cols)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let net = Network::new(&spec, &w, &Device::Cpu).unwrap();
        let x = Tensor::from_slice(&images, (n, 1, d.rows, d.cols), &Device::Cpu).unwrap();
        let logits = net.forward(&x).unwrap();
        assert_eq!(logits.dims(), &[n, d.classes]);
        let got = logits.to_vec2::<f32>().unwrap();
        let len = d.rows * d.cols;
        for (i, row) in got.iter().enumerate() {
            let want = reference_logits(&d, &w, &images[i * len..(i + 1) * len]);
            for (g, e) in row.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "image {i}: {row:?} vs {want:?}");
            }
        }
        // Wrong input size is a clear error.
        let bad = Tensor::zeros((1, 1, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(
            net.forward(&bad)
                .unwrap_err()
                .to_string()
                .contains("[N, 1, 8, 12]")
        );
        // The fused inference path gives the same logits.
        let fused = net.predict(&x).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in fused.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn manual_backward_matches_autograd() {
        for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
            manual_backward_matches_autograd_for(test_spec(layer));
        }
    }

    fn manual_backward_matches_autograd_for(spec: ModelSpec) {
        // Larger weights than the default init so that ReLUs are mixed and
        // the loss is far from uniform.
        let w = init_weights(&spec, 21).unwrap();
        let w = w
            .with_flat_values(&w.to_flat().iter().map(|v| 3.0 * v).collect::<Vec<_>>())
            .unwrap();
        let mut rng = StdRng::seed_from_u64(22);
        let n = 9;
        let images: Vec<f32> = (0..n * 8 * 12)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..5)).collect();
        let x = Tensor::from_slice(&images, (n, 1, 8, 12), &Device::Cpu).unwrap();
        let y = Tensor::from_slice(&labels, n, &Device::Cpu).unwrap();
        let net = Network::new(&spec, &w, &Device::Cpu).unwrap();
        let manual = net.loss_and_grads(&x, &y).unwrap();
        let auto = autograd_loss_and_grads(&net.forward(&x).unwrap(), &y, &net.vars()).unwrap();
        assert!(
            (manual.loss - auto.loss).abs() < 1e-5,
            "{} vs {}",
            manual.loss,
            auto.loss
        );
        let mut nonzero = 0;
        for (i, (m, a)) in manual.grads.iter().zip(&auto.grads).enumerate() {
            assert_eq!(m.dims(), a.dims(), "grad {i}");
            let m = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (u, v) in m.iter().zip(&a) {
                assert!(
                    (u - v).abs() < 1e-5 * (1.0 + v.abs()),
                    "grad {i}: {u} vs {v}"
                );
            }
            nonzero += a.iter().filter(|v| v.abs() > 1e-6).count();
        }
        assert!(nonzero > 100);
    }
}
