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
}
