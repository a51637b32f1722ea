//! A small safe wrapper over zlib's inflate (libz-rs-sys, zlib's C API implemented in Rust) for
//! what flate2 does not expose: stopping at deflate block boundaries (`Z_BLOCK`), the bit position
//! there (`data_type`), and resuming mid-stream (`inflatePrime`, `inflateSetDictionary`) — the zran
//! technique of zlib's `examples/zran.c`.

use libz_rs_sys as z;

/// What one [`Inflater::step`] did.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output bytes produced.
    pub produced: usize,
    /// The deflate (gzip: member) stream ended.
    pub end: bool,
    /// Stopped just after a block's end (or a gzip header), not in the last block.
    pub at_block_boundary: bool,
    /// Unused bits in the last consumed byte (`data_type & 7`).
    pub bits: u8,
}

/// An inflate stream.
pub struct Inflater {
    // Boxed: zlib's state points back at its stream, which must not move.
    strm: Box<z::z_stream>,
}

// SAFETY: the stream and its state are owned by this value and only used through `&mut self`.
unsafe impl Send for Inflater {}

impl Inflater {
    /// A gzip decoder (header and trailer checked).
    pub fn gzip() -> Result<Inflater, String> {
        Inflater::new(15 + 16)
    }

    /// A raw deflate decoder (no header), for resuming at a checkpoint.
    pub fn raw() -> Result<Inflater, String> {
        Inflater::new(-15)
    }

    fn new(window_bits: i32) -> Result<Inflater, String> {
        let mut strm = Box::<z::z_stream>::default();
        // SAFETY: `strm` is a valid, default-initialised stream (allocator set by Default); the
        // version string and struct size are zlib's own.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if rc != z::Z_OK {
            return Err(format!("inflateInit2: {rc}"));
        }
        Ok(Inflater { strm })
    }

    /// Starts the stream `bits` bits into a byte whose remaining high bits are `value`'s low bits.
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), String> {
        // SAFETY: the stream was initialised by `new`.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, bits as i32, value as i32) };
        (rc == z::Z_OK)
            .then_some(())
            .ok_or_else(|| format!("inflatePrime: {rc}"))
    }

    /// Sets the history a raw stream resumes with.
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), String> {
        // SAFETY: `dict` is valid for `dict.len()` bytes; zlib copies it.
        let rc =
            unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) };
        (rc == z::Z_OK)
            .then_some(())
            .ok_or_else(|| format!("inflateSetDictionary: {rc}"))
    }

    /// Resets for the next gzip member.
    pub fn reset(&mut self) -> Result<(), String> {
        // SAFETY: the stream was initialised by `new`.
        let rc = unsafe { z::inflateReset(&mut *self.strm) };
        (rc == z::Z_OK)
            .then_some(())
            .ok_or_else(|| format!("inflateReset: {rc}"))
    }

    /// Inflates from `input` into `output`; with `block`, stops at the next block boundary.
    pub fn step(&mut self, input: &[u8], output: &mut [u8], block: bool) -> Result<Step, String> {
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = output.as_mut_ptr();
        s.avail_out = output.len().min(u32::MAX as usize) as u32;
        let (in0, out0) = (s.avail_in, s.avail_out);
        let flush = if block { z::Z_BLOCK } else { z::Z_NO_FLUSH };
        // SAFETY: next_in/next_out point into `input`/`output`, valid for avail_in/avail_out bytes
        // for the duration of the call; the pointers are not used after it.
        let rc = unsafe { z::inflate(s, flush) };
        let consumed = (in0 - s.avail_in) as usize;
        let produced = (out0 - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        match rc {
            z::Z_OK | z::Z_STREAM_END | z::Z_BUF_ERROR => {}
            z::Z_NEED_DICT => return Err("the stream needs a preset dictionary".into()),
            _ => {
                let msg = if s.msg.is_null() {
                    format!("error {rc}")
                } else {
                    // SAFETY: zlib's msg is a NUL-terminated static string when set.
                    unsafe { std::ffi::CStr::from_ptr(s.msg) }
                        .to_string_lossy()
                        .into_owned()
                };
                return Err(format!("corrupt deflate stream: {msg}"));
            }
        }
        if rc == z::Z_BUF_ERROR && consumed == 0 && produced == 0 && !input.is_empty() {
            return Err("inflate made no progress".into());
        }
        let dt = s.data_type;
        Ok(Step {
            consumed,
            produced,
            end: rc == z::Z_STREAM_END,
            at_block_boundary: dt & 128 != 0 && dt & 64 == 0,
            bits: (dt & 7) as u8,
        })
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new` and is not used again.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

/// Inflates one gzip span from its checkpoint: `comp` is the span's compressed bytes (its first
/// byte shared with the previous span when `bits > 0`), `window` the 32 KiB of output before it;
/// returns exactly `out_len` bytes.
pub fn inflate_span(
    comp: &[u8],
    bits: u8,
    window: &[u8],
    out_len: usize,
) -> Result<Vec<u8>, String> {
    let (mut inf, input) = Inflater::at_checkpoint(comp, bits, window)?;
    let mut out = vec![0u8; out_len];
    let done = inf.inflate_into(input, &mut out)?;
    if done != out_len {
        return Err(format!(
            "the span inflated to {done} bytes, the table says {out_len}"
        ));
    }
    Ok(out)
}

impl Inflater {
    /// A raw inflater resuming at a span's checkpoint: `comp` starts with the span's compressed
    /// bytes (its first byte shared with the previous span when `bits > 0`), `window` is the 32 KiB
    /// of output before it. Returns the inflater and the input left to feed it.
    pub fn at_checkpoint<'c>(
        comp: &'c [u8],
        bits: u8,
        window: &[u8],
    ) -> Result<(Inflater, &'c [u8]), String> {
        let mut inf = Inflater::raw()?;
        let mut input = comp;
        if bits > 0 {
            let (&first, rest) = comp
                .split_first()
                .ok_or("a span starting mid-byte has no bytes")?;
            inf.prime(bits, first >> (8 - bits))?;
            input = rest;
        }
        if !window.is_empty() {
            inf.set_dictionary(window)?;
        }
        Ok((inf, input))
    }

    /// Inflates `input` into `out` until the input gives nothing more, the stream ends or `out` is
    /// full; returns the bytes written.
    pub fn inflate_into(&mut self, mut input: &[u8], out: &mut [u8]) -> Result<usize, String> {
        let mut done = 0;
        while done < out.len() {
            let st = self.step(input, &mut out[done..], false)?;
            input = &input[st.consumed..];
            done += st.produced;
            if st.end || (st.consumed == 0 && st.produced == 0) {
                break;
            }
        }
        Ok(done)
    }
}
