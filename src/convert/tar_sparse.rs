//! GNU sparse files in tar: the old GNU `S` entry (map in the header and its extension blocks) and the
//! PAX forms 0.0 (`GNU.sparse.offset`/`numbytes` records), 0.1 (`GNU.sparse.map`) and 1.0 (the map at
//! the start of the entry's data). The archive holds only the data segments; [`SparseMap::read`]
//! expands them back to the file's real size with zeros in the holes (which the ext4 writer then
//! leaves unallocated). Maps are validated (sorted, disjoint, inside the file, adding up to the stored
//! data) and bounded in size.

/// Most segments one sparse file may have (16 bytes each in memory).
pub const MAX_SEGMENTS: usize = 1 << 20;

/// Where the data of a sparse file lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseMap {
    /// The file's size.
    pub real_size: u64,
    /// `(offset, length)` of each data segment, in order.
    pub segments: Vec<(u64, u64)>,
}

impl SparseMap {
    /// Checks the map against the number of data bytes stored in the archive.
    pub fn validate(&self, stored: u64) -> Result<(), String> {
        if self.segments.len() > MAX_SEGMENTS {
            return Err(format!(
                "sparse map of {} segments (limit {MAX_SEGMENTS})",
                self.segments.len()
            ));
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, len) in &self.segments {
            if off < end {
                return Err(format!(
                    "sparse segment at {off} overlaps or is out of order"
                ));
            }
            end = off
                .checked_add(len)
                .ok_or_else(|| format!("sparse segment at {off} overflows"))?;
            if end > self.real_size {
                return Err(format!(
                    "sparse segment {off}+{len} ends beyond the file's size {}",
                    self.real_size
                ));
            }
            total += len;
        }
        if total != stored {
            return Err(format!(
                "sparse map covers {total} bytes but the entry stores {stored}"
            ));
        }
        Ok(())
    }

    /// A cursor over the expanded file.
    pub fn cursor(self) -> Cursor {
        Cursor {
            map: self,
            pos: 0,
            seg: 0,
        }
    }
}

/// A position in the expanded content of a sparse file.
pub struct Cursor {
    map: SparseMap,
    pos: u64,
    seg: usize,
}

impl Cursor {
    /// The map being expanded.
    pub fn map(&self) -> &SparseMap {
        &self.map
    }

    /// Fills `buf` with the next expanded bytes, taking segment data from `data` (the stored
    /// segments, back to back). 0 at the end of the file.
    pub fn read(
        &mut self,
        buf: &mut [u8],
        mut data: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        if buf.is_empty() || self.pos >= self.map.real_size {
            return Ok(0);
        }
        while let Some(&(off, len)) = self.map.segments.get(self.seg) {
            if self.pos >= off + len {
                self.seg += 1;
                continue;
            }
            if self.pos < off {
                let n = ((off - self.pos) as usize).min(buf.len());
                buf[..n].fill(0);
                self.pos += n as u64;
                return Ok(n);
            }
            let n = ((off + len - self.pos) as usize).min(buf.len());
            let got = data(&mut buf[..n])?;
            if got == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "tar stream ends inside sparse file data",
                ));
            }
            self.pos += got as u64;
            return Ok(got);
        }
        let n = ((self.map.real_size - self.pos) as usize).min(buf.len());
        buf[..n].fill(0);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Parses `count` decimal `offset,length` numbers of a 0.1 `GNU.sparse.map` value.
pub fn parse_map_record(v: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let s = std::str::from_utf8(v).map_err(|_| "GNU.sparse.map is not text".to_string())?;
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let nums: Vec<u64> = s
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<u64>()
                .map_err(|_| format!("GNU.sparse.map: bad number {n:?}"))
        })
        .collect::<Result<_, _>>()?;
    if nums.len() & 1 != 0 {
        return Err("GNU.sparse.map has an odd count of numbers".into());
    }
    if nums.len() / 2 > MAX_SEGMENTS {
        return Err(format!("GNU.sparse.map: more than {MAX_SEGMENTS} segments"));
    }
    Ok(nums.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

/// Reads the 1.0 map from the start of the data with `next_block` (512-byte blocks): the count, then
/// offset and length pairs, one decimal number per line, padded to a block. Returns the map and the
/// blocks it took.
pub fn parse_map_blocks(
    mut next_block: impl FnMut() -> Result<[u8; 512], String>,
) -> Result<(Vec<(u64, u64)>, u64), String> {
    let mut blocks = 0u64;
    let mut text: Vec<u8> = Vec::new();
    let mut nums: Vec<u64> = Vec::new();
    let mut want: Option<usize> = None;
    loop {
        let b = next_block()?;
        blocks += 1;
        text.extend_from_slice(&b);
        // Take every complete line.
        while let Some(nl) = text.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = text.drain(..=nl).collect();
            let s = std::str::from_utf8(&line[..line.len() - 1])
                .map_err(|_| "sparse map line is not text".to_string())?;
            let n: u64 = s
                .parse()
                .map_err(|_| format!("sparse map: bad number {s:?}"))?;
            match want {
                None => {
                    let count = usize::try_from(n).unwrap_or(usize::MAX);
                    if count > MAX_SEGMENTS {
                        return Err(format!("sparse map of {n} segments (limit {MAX_SEGMENTS})"));
                    }
                    want = Some(count * 2);
                }
                Some(_) => nums.push(n),
            }
            if want == Some(nums.len()) {
                return Ok((nums.chunks_exact(2).map(|p| (p[0], p[1])).collect(), blocks));
            }
        }
        if text.len() > 64 {
            return Err("sparse map line too long".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn expands_holes_and_checks_maps() {
        let m = SparseMap {
            real_size: 20,
            segments: vec![(2, 3), (10, 2), (19, 0)],
        };
        m.validate(5).unwrap();
        let expand = |data: &[u8]| -> std::io::Result<Vec<u8>> {
            let mut c = m.clone().cursor();
            let mut src = data;
            let mut out = Vec::new();
            let mut buf = [0u8; 3];
            loop {
                let n = c.read(&mut buf, |b| src.read(b))?;
                if n == 0 {
                    return Ok(out);
                }
                out.extend_from_slice(&buf[..n]);
            }
        };
        assert_eq!(
            &expand(b"abcde").unwrap(),
            b"\0\0abc\0\0\0\0\0de\0\0\0\0\0\0\0\0"
        );
        assert!(m.validate(6).unwrap_err().contains("covers 5"));
        let overlap = SparseMap {
            real_size: 20,
            segments: vec![(2, 5), (4, 1)],
        };
        assert!(overlap.validate(6).is_err());
        let beyond = SparseMap {
            real_size: 4,
            segments: vec![(2, 5)],
        };
        assert!(beyond.validate(5).is_err());
        // Short data is an error, not zeros.
        assert!(expand(b"ab").is_err());
    }

    #[test]
    fn map_forms() {
        assert_eq!(
            parse_map_record(b"0,10,4096,5").unwrap(),
            [(0, 10), (4096, 5)]
        );
        assert!(parse_map_record(b"1,2,3").is_err());
        let mut text = b"2\n0\n10\n4096\n5\n".to_vec();
        text.resize(512, 0);
        let block: [u8; 512] = text.try_into().unwrap();
        let mut once = Some(block);
        let (m, blocks) =
            parse_map_blocks(|| once.take().ok_or_else(|| "eof".to_string())).unwrap();
        assert_eq!((m, blocks), (vec![(0, 10), (4096, 5)], 1));
        let mut huge = b"99999999999\n".to_vec();
        huge.resize(512, 0);
        let block: [u8; 512] = huge.try_into().unwrap();
        assert!(parse_map_blocks(|| Ok(block)).is_err());
    }
}
