//! Cutting images into the non-overlapping patches (cipher blocks) that the
//! token models ([`super::Vit`], [`super::Mixer`]) embed.

use candle_core::Tensor;

use crate::error::Result;

/// The patch grid of an image: `planes` planes of `grid_rows * patch` by
/// `grid_cols * patch` pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PatchGrid {
    /// Image planes `I`.
    pub planes: usize,
    /// Patches per image column (`R / P`).
    pub grid_rows: usize,
    /// Patches per image row (`W / P`).
    pub grid_cols: usize,
    /// Patch edge `P`.
    pub patch: usize,
}

impl PatchGrid {
    /// Patches per image `T`.
    pub fn tokens(&self) -> usize {
        self.grid_rows * self.grid_cols
    }

    /// Values per patch `I * P * P`.
    pub fn patch_len(&self) -> usize {
        self.planes * self.patch * self.patch
    }

    /// `[N, I, R, W] -> [N, R/P, W/P, I, P, P] -> [N * T, I * P * P]`, the
    /// same patch vectors as [`crate::model::BlockNet`]'s (ordered plane,
    /// row, column); `by_position` groups them by patch position instead:
    /// `[T, N, I * P * P]` (contiguous).
    pub fn patches(&self, images: &Tensor, n: usize, by_position: bool) -> Result<Tensor> {
        let (gr, gc, p) = (self.grid_rows, self.grid_cols, self.patch);
        let grouped = match (self.planes == 1, by_position) {
            (true, false) => images
                .reshape((n, gr, p, gc, p))?
                .permute((0, 1, 3, 2, 4))?,
            (true, true) => images
                .reshape((n, gr, p, gc, p))?
                .permute((1, 3, 0, 2, 4))?,
            (false, false) => images
                .reshape((n, self.planes, gr, p, gc, p))?
                .permute((0, 2, 4, 1, 3, 5))?,
            (false, true) => images
                .reshape((n, self.planes, gr, p, gc, p))?
                .permute((2, 4, 0, 1, 3, 5))?,
        };
        Ok(if by_position {
            grouped.reshape((self.tokens(), n, self.patch_len()))?
        } else {
            grouped.reshape((n * self.tokens(), self.patch_len()))?
        })
    }
}
