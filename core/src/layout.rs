//! Shapes and strides of `[batch, seq, heads, head_dim]` tensors, and the
//! validation every backend shares (CPU slices here, device pointers in the
//! CUDA driver and the C ABI).

use crate::error::{Dim, Error, Operand, Result};
use crate::Element;

/// Shape and element strides of a BSHD tensor. The last dimension
/// (`dim`) is contiguous; batch, seq and head strides are free, so engines
/// can pass views (the FlashAttention-2 convention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub dim: usize,
    pub stride_batch: usize,
    pub stride_seq: usize,
    pub stride_head: usize,
}

impl Layout {
    /// A densely packed `[batch, seq, heads, dim]` layout.
    pub const fn contiguous(batch: usize, seq: usize, heads: usize, dim: usize) -> Self {
        Layout {
            batch,
            seq,
            heads,
            dim,
            stride_head: dim,
            stride_seq: heads * dim,
            stride_batch: seq * heads * dim,
        }
    }

    /// Offset of element `(b, s, h, 0)`. Only meaningful after [`Layout::required_len`]
    /// succeeded and the indices are in range.
    #[inline(always)]
    pub fn offset(&self, b: usize, s: usize, h: usize) -> usize {
        b * self.stride_batch + s * self.stride_seq + h * self.stride_head
    }

    /// Number of elements of the product of all dimensions.
    pub fn num_elements(&self, operand: Operand) -> Result<usize> {
        self.batch
            .checked_mul(self.seq)
            .and_then(|x| x.checked_mul(self.heads))
            .and_then(|x| x.checked_mul(self.dim))
            .ok_or(Error::SizeOverflow { operand })
    }

    /// Checks that no dimension is zero and returns the length a buffer needs
    /// (one past the largest offset), with overflow reported as an error.
    pub fn required_len(&self, operand: Operand) -> Result<usize> {
        for (extent, dim) in [
            (self.batch, Dim::Batch),
            (self.seq, Dim::Seq),
            (self.heads, Dim::Heads),
            (self.dim, Dim::HeadDim),
        ] {
            if extent == 0 {
                return Err(Error::EmptyDimension { operand, dim });
            }
        }
        let overflow = Error::SizeOverflow { operand };
        let mut last = self.dim - 1;
        for (extent, stride) in
            [(self.batch, self.stride_batch), (self.seq, self.stride_seq), (self.heads, self.stride_head)]
        {
            let span = (extent - 1).checked_mul(stride).ok_or(overflow)?;
            last = last.checked_add(span).ok_or(overflow)?;
        }
        last.checked_add(1).ok_or(overflow)
    }

    /// True when distinct elements have distinct offsets. The test is the
    /// usual sufficient one: sorted by stride, each dimension steps over the
    /// whole span of the faster ones. Dimensions of extent 1 never collide.
    pub fn is_non_overlapping(&self) -> bool {
        let mut dims =
            [(self.stride_head, self.heads), (self.stride_seq, self.seq), (self.stride_batch, self.batch)];
        dims.sort_unstable();
        let mut span = self.dim; // elements covered by the faster dimensions
        for (stride, extent) in dims {
            if extent <= 1 {
                continue;
            }
            if stride < span {
                return false;
            }
            span = match (extent - 1).checked_mul(stride).and_then(|x| x.checked_add(span)) {
                Some(s) => s,
                None => return false,
            };
        }
        true
    }
}

/// A read-only view of an input tensor in host memory.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a, T> {
    pub data: &'a [T],
    pub layout: Layout,
}

impl<'a, T> Tensor<'a, T> {
    pub const fn new(data: &'a [T], layout: Layout) -> Self {
        Tensor { data, layout }
    }
}

/// A writable view of an f32 output tensor in host memory.
#[derive(Debug)]
pub struct TensorMut<'a> {
    pub data: &'a mut [f32],
    pub layout: Layout,
}

impl<'a> TensorMut<'a> {
    pub fn new(data: &'a mut [f32], layout: Layout) -> Self {
        TensorMut { data, layout }
    }
}

/// The sizes of one attention call, derived from validated Q, K, V layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub batch: usize,
    /// Query rows N.
    pub q_len: usize,
    /// Key rows M.
    pub kv_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// Head dimension d of Q and K.
    pub head_dim: usize,
    /// Head dimension of V and of the output.
    pub v_dim: usize,
}

/// Column indices of a plan are `u16`.
pub const MAX_HEAD_DIM: usize = 1 << 16;

impl Problem {
    /// Validates the shapes of Q, K, V against each other: same batch, same
    /// head dimension for Q and K, same key count and KV heads for K and V,
    /// query heads a multiple of KV heads, nothing empty, nothing overflowing.
    pub fn new(q: &Layout, k: &Layout, v: &Layout) -> Result<Problem> {
        q.required_len(Operand::Q)?;
        k.required_len(Operand::K)?;
        v.required_len(Operand::V)?;
        let expect = |operand, dim, expected, got| {
            if expected == got {
                Ok(())
            } else {
                Err(Error::ShapeMismatch { operand, dim, expected, got })
            }
        };
        expect(Operand::K, Dim::Batch, q.batch, k.batch)?;
        expect(Operand::V, Dim::Batch, q.batch, v.batch)?;
        expect(Operand::K, Dim::HeadDim, q.dim, k.dim)?;
        expect(Operand::V, Dim::Seq, k.seq, v.seq)?;
        expect(Operand::V, Dim::Heads, k.heads, v.heads)?;
        if !q.heads.is_multiple_of(k.heads) {
            return Err(Error::HeadsNotDivisible { q_heads: q.heads, kv_heads: k.heads });
        }
        if q.dim > MAX_HEAD_DIM {
            return Err(Error::HeadDimTooLarge { got: q.dim, max: MAX_HEAD_DIM });
        }
        Ok(Problem {
            batch: q.batch,
            q_len: q.seq,
            kv_len: k.seq,
            q_heads: q.heads,
            kv_heads: k.heads,
            head_dim: q.dim,
            v_dim: v.dim,
        })
    }

    /// The KV head that query head `h` reads.
    #[inline(always)]
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.q_heads / self.kv_heads)
    }

    /// Dense layout of the output `[batch, q_len, q_heads, v_dim]`.
    pub fn output_layout(&self) -> Layout {
        Layout::contiguous(self.batch, self.q_len, self.q_heads, self.v_dim)
    }

    /// Number of row log-sum-exp values, stored densely as `[batch, q_heads, q_len]`.
    pub fn lse_len(&self) -> Result<usize> {
        self.batch
            .checked_mul(self.q_heads)
            .and_then(|x| x.checked_mul(self.q_len))
            .ok_or(Error::SizeOverflow { operand: Operand::Lse })
    }

    /// Checks an output layout: the shape `[batch, q_len, q_heads, v_dim]`,
    /// no overlapping elements, and a buffer long enough. Returns its required length.
    pub fn check_output(&self, o: &Layout) -> Result<usize> {
        let needed = o.required_len(Operand::Output)?;
        for (dim, expected, got) in [
            (Dim::Batch, self.batch, o.batch),
            (Dim::Seq, self.q_len, o.seq),
            (Dim::Heads, self.q_heads, o.heads),
            (Dim::HeadDim, self.v_dim, o.dim),
        ] {
            if expected != got {
                return Err(Error::ShapeMismatch { operand: Operand::Output, dim, expected, got });
            }
        }
        if !o.is_non_overlapping() {
            return Err(Error::OverlappingOutput { operand: Operand::Output });
        }
        Ok(needed)
    }

    /// First key index row `i` may not see: `M` without a mask, and
    /// `i + 1 + M - N` (clamped to `0..=M`) with the bottom-right aligned causal mask.
    #[inline(always)]
    pub fn key_limit(&self, causal: bool, i: usize) -> usize {
        if !causal {
            return self.kv_len;
        }
        // i + 1 + (M - N), computed without going negative.
        let visible = (i + 1 + self.kv_len).saturating_sub(self.q_len);
        visible.min(self.kv_len)
    }
}

/// Checks that a host slice covers a layout.
pub(crate) fn check_buffer(operand: Operand, len: usize, layout: &Layout) -> Result<()> {
    let needed = layout.required_len(operand)?;
    if len < needed {
        return Err(Error::BufferTooSmall { operand, needed, got: len });
    }
    Ok(())
}

/// Rejects NaN and infinities among the elements a layout addresses.
pub(crate) fn check_finite<T: Element>(operand: Operand, t: &Tensor<'_, T>) -> Result<()> {
    let l = &t.layout;
    for b in 0..l.batch {
        for s in 0..l.seq {
            for h in 0..l.heads {
                let base = l.offset(b, s, h);
                for (j, x) in t.data[base..base + l.dim].iter().enumerate() {
                    if !x.to_f32().is_finite() {
                        return Err(Error::NonFinite { operand, offset: base + j });
                    }
                }
            }
        }
    }
    Ok(())
}
