//! A safe, bounds-checked wrapper around the `gemm` crate's `f32` matrix
//! product, the kernel behind candle's CPU matmul, for hand-written passes
//! that work on plain slices and reuse their buffers (no tensor allocation
//! per product). Operands are strided views, so transposes cost nothing.

use gemm::Parallelism;

use crate::error::{ParticipantError, Result};

/// A read-only strided view of a `rows x cols` matrix: element `(i, j)` is
/// `data[i * rs + j * cs]`. Every such index is inside `data` (checked when
/// the view is made; transposing keeps it true).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// The row-major `rows x cols` matrix at the start of `data`; an error
    /// when `data` is too short.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        match rows.checked_mul(cols) {
            Some(len) if len <= data.len() => Ok(Self {
                data,
                rows,
                cols,
                rs: cols,
                cs: 1,
            }),
            _ => Err(ParticipantError::Model(format!(
                "matrix {rows}x{cols} does not fit {} values",
                data.len()
            ))),
        }
    }

    /// The transpose (a view, no copy).
    /// Number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The columns `start..start + count` of a matrix that is not a
    /// transposed view (the same rows, the same row stride).
    pub(crate) fn columns(self, start: usize, count: usize) -> Result<Self> {
        if self.cs != 1 || start.checked_add(count).is_none_or(|end| end > self.cols) {
            return Err(ParticipantError::Model(format!(
                "columns {start}..+{count} of a {}x{} matrix",
                self.rows, self.cols
            )));
        }
        Ok(Self {
            data: &self.data[start.min(self.data.len())..],
            cols: count,
            ..self
        })
    }

    /// The values it was made from (its first element first).
    pub(crate) fn data(&self) -> &'a [f32] {
        self.data
    }

    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst = a @ b`, or `dst += a @ b` when `accumulate`, for the row-major
/// `dst [a.rows, b.cols]` (which must have exactly that many values).
pub(crate) fn matmul(
    dst: &mut [f32],
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    par: Parallelism,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || m.checked_mul(n) != Some(dst.len()) {
        return Err(ParticipantError::Model(format!(
            "matmul: [{m}, {k}] @ [{}, {n}] into {} values",
            b.rows,
            dst.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    // Strides are at most a slice length, hence at most isize::MAX.
    let s = |v: usize| v as isize;
    // SAFETY: `gemm` reads `a` at `i * a.rs + l * a.cs` for `i < m`, `l < k`
    // and `b` at `l * b.rs + j * b.cs` for `l < k`, `j < n`; `MatRef::new`
    // checked that every such index is inside the view's slice (transposes
    // swap rows with columns and strides together). It writes (and, when
    // accumulating, reads) `dst` at `i * n + j < m * n = dst.len()`. `dst`
    // is a unique borrow, so it overlaps neither operand, and all three
    // slices outlive the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            s(n),
            accumulate,
            a.data.as_ptr(),
            s(a.cs),
            s(a.rs),
            b.data.as_ptr(),
            s(b.cs),
            s(b.rs),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `sum x[i]^2`, in eight `f32` lanes (vectorised) added up in `f64`.
pub(crate) fn sum_of_squares(x: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v * v)).sum();
    lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + tail
}

/// The Gram matrix `a a^T` (`[r, r]`) of `a [r, p]` into `out`.
pub(crate) fn gram(a: MatRef<'_>, out: &mut [f32]) -> Result<()> {
    matmul(out, a, a.t(), false, Parallelism::None)
}

/// `sum a[i] b[i]` in `f64`.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x * y)).sum()
}

/// `|a^T b|^2` (Frobenius) for `a [r, p]` and `b [r, q]`: one example's
/// gradient norm of a product `y = x W` whose `r` rows of input are `b` and
/// of output gradient `a`. Where `r^2 < p q` it never forms the gradient
/// (a ghost norm, Goodfellow 2015 / Li et al. 2022: `sum (a a^T) * (b
/// b^T)` over the `r x r` Gram matrices); otherwise it forms it in
/// `scratch`.
pub(crate) fn product_grad_norm_sq(
    a: MatRef<'_>,
    b: MatRef<'_>,
    scratch: &mut Vec<f32>,
) -> Result<f64> {
    let (r, p, q) = (a.rows, a.cols, b.cols);
    if b.rows != r {
        return Err(ParticipantError::Model(format!(
            "gradient norm: {r} rows of output gradient, {} of input",
            b.rows
        )));
    }
    let seq = Parallelism::None;
    if r * r < p * q {
        let buf = super::conv::sized(scratch, 2 * r * r);
        let (ga, gb) = buf.split_at_mut(r * r);
        gram(a, ga)?;
        gram(b, gb)?;
        Ok(dot(ga, gb))
    } else {
        let buf = super::conv::sized(scratch, p * q);
        matmul(buf, a.t(), b, false, seq)?;
        Ok(sum_of_squares(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn products_and_transposes_match_naive_loops() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|v| (v as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|v| (v as f32 * 0.91).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut got = vec![9f32; m * n];
        let (am, bm) = (
            MatRef::new(&a, m, k).unwrap(),
            MatRef::new(&b, k, n).unwrap(),
        );
        matmul(&mut got, am, bm, false, Parallelism::None).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
        // Accumulating adds the product again.
        matmul(&mut got, am, bm, true, Parallelism::None).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - 2.0 * w).abs() < 1e-5);
        }
        // (a @ b)^T = b^T @ a^T, through transposed views.
        let mut t = vec![0f32; n * m];
        matmul(&mut t, bm.t(), am.t(), false, Parallelism::Rayon(2)).unwrap();
        for i in 0..m {
            for j in 0..n {
                assert!((t[j * m + i] - want[i * n + j]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = vec![1f32; 6];
        assert!(MatRef::new(&a, 4, 2).is_err());
        assert!(MatRef::new(&a, usize::MAX, 2).is_err());
        let m = MatRef::new(&a, 2, 3).unwrap();
        let mut dst = vec![0f32; 4];
        assert!(matmul(&mut dst, m, m, false, Parallelism::None).is_err());
        let mut dst = vec![0f32; 3];
        assert!(matmul(&mut dst, m, m.t(), false, Parallelism::None).is_err());
        let mut dst = vec![5f32; 4];
        let empty = MatRef::new(&a, 2, 0).unwrap();
        matmul(&mut dst, empty, empty.t(), false, Parallelism::None).unwrap();
        assert_eq!(dst, [0.0; 4]);
    }

    #[test]
    fn gradient_norms_of_products_match_the_formed_gradient() {
        // (rows, p, q): ghost (r^2 < p q) and formed (r^2 >= p q) branches.
        for (r, p, q) in [(3, 5, 4), (9, 2, 3), (1, 7, 6)] {
            let a: Vec<f32> = (0..r * p).map(|v| (v as f32 * 0.61).sin()).collect();
            let b: Vec<f32> = (0..r * q).map(|v| (v as f32 * 0.29).cos()).collect();
            let mut at = vec![0f32; p * r];
            for i in 0..r {
                for j in 0..p {
                    at[j * r + i] = a[i * p + j];
                }
            }
            let grad = naive(&at, &b, p, r, q);
            let want: f64 = grad.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
            let mut scratch = Vec::new();
            let got = product_grad_norm_sq(
                MatRef::new(&a, r, p).unwrap(),
                MatRef::new(&b, r, q).unwrap(),
                &mut scratch,
            )
            .unwrap();
            assert!(
                (got / want - 1.0).abs() < 1e-5,
                "{r}x{p}x{q}: {got} vs {want}"
            );
            assert!((sum_of_squares(&grad) / want - 1.0).abs() < 1e-6);
        }
        // A column view reads the right values.
        let m: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let view = MatRef::new(&m, 3, 4).unwrap().columns(1, 2).unwrap();
        let mut out = vec![0f32; 9];
        gram(view, &mut out).unwrap();
        // Rows (1, 2), (5, 6), (9, 10).
        assert_eq!(out[..3], [5.0, 17.0, 29.0]);
        assert!(MatRef::new(&m, 3, 4).unwrap().columns(3, 2).is_err());
        assert!(MatRef::new(&m, 3, 4).unwrap().t().columns(0, 1).is_err());
    }
}
