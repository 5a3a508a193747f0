//! [`Region`]: one contiguous byte array (a column of a buffer) in an
//! anonymous or file-backed memory map, managed in fixed-size chunks that
//! are resident, compressed, or released.
//!
//! Anonymous maps are committed by the OS page by page as they are written,
//! so a half-full buffer holds half its capacity, and a chunk that is
//! compressed or dead is handed back with `madvise(MADV_DONTNEED)`. File
//! maps reserve disk space with `posix_fallocate` before any page is
//! touched, so a full disk is an error and never a `SIGBUS`.

use crate::codec::{self, Scratch};
use crate::error::{Error, Result};
use memmap2::{Advice, MmapMut, MmapOptions, UncheckedAdvice};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Unique id of one compressed image of a chunk (process-wide), the key of
/// [`ReadCache`] entries: a cache can never serve a stale image.
static NEXT_GEN: AtomicU64 = AtomicU64::new(1);

/// Where a region's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backing {
    /// Anonymous private memory.
    Anon,
    /// An unlinked temporary file in this directory.
    File(PathBuf),
}

#[derive(Debug)]
pub(crate) enum Chunk {
    /// Never written, or released: not resident, contents meaningless.
    Empty,
    /// Resident and valid. `incompressible`: compression was tried on the
    /// current contents and did not pay.
    Raw { incompressible: bool },
    /// Valid only in compressed form (the map's pages are released).
    Compressed { data: Box<[u8]>, gen: u64 },
}

#[derive(Debug)]
struct FileBacking {
    file: File,
    dir: PathBuf,
    reserved: u64,
    step: u64,
}

/// One column's bytes. See the module docs.
#[derive(Debug)]
pub(crate) struct Region {
    map: MmapMut,
    len: usize,
    chunk_bytes: usize,
    shift: u32,
    elem: usize,
    states: Vec<Chunk>,
    file: Option<FileBacking>,
    /// Compression tier: 1 for bulk data (rows, wide fields), compressed
    /// first; 2 for narrow per-slot columns, compressed only when tier 1 was
    /// not enough (a sampled slot decompresses a whole chunk for a few bytes).
    tier: u8,
    raw_chunks: usize,
    compressed_chunks: usize,
    compressed_bytes: usize,
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

impl Region {
    /// A region of `len` bytes holding elements of `elem` bytes, in chunks
    /// of `chunk_bytes` (a power of two, multiple of the page size).
    pub(crate) fn new(
        len: usize,
        elem: usize,
        chunk_bytes: usize,
        backing: &Backing,
    ) -> Result<Self> {
        debug_assert!(chunk_bytes.is_power_of_two() && chunk_bytes >= 4096);
        let map_len = round_up(len.max(1), chunk_bytes);
        let chunks = map_len / chunk_bytes;
        let (map, file) = match backing {
            Backing::Anon => {
                let map = MmapOptions::new()
                    .len(map_len)
                    .map_anon()
                    .map_err(|source| Error::Storage {
                        action: "map anonymous memory",
                        path: PathBuf::new(),
                        bytes: map_len as u64,
                        source,
                    })?;
                // Exact accounting: keep transparent huge pages out, so pages
                // are committed and released 4 KiB at a time. Advisory only.
                let _ = map.advise(Advice::NoHugePage);
                (map, None)
            }
            Backing::File(dir) => {
                let file = tempfile::tempfile_in(dir).map_err(|source| Error::Storage {
                    action: "create backing file in",
                    path: dir.clone(),
                    bytes: map_len as u64,
                    source,
                })?;
                // SAFETY: the file is a fresh unlinked temporary that no other
                // process can open; we only touch pages below the size reserved
                // with posix_fallocate (see `reserve`), so no access faults.
                let map = unsafe { MmapOptions::new().len(map_len).map_mut(&file) }.map_err(
                    |source| Error::Storage {
                        action: "map backing file in",
                        path: dir.clone(),
                        bytes: map_len as u64,
                        source,
                    },
                )?;
                let step = (map_len as u64 / 8).clamp(chunk_bytes as u64, 64 << 20);
                let step = round_up(step as usize, chunk_bytes) as u64;
                (
                    map,
                    Some(FileBacking {
                        file,
                        dir: dir.clone(),
                        reserved: 0,
                        step,
                    }),
                )
            }
        };
        let mut r = Self {
            map,
            len,
            chunk_bytes,
            shift: chunk_bytes.trailing_zeros(),
            elem,
            states: (0..chunks).map(|_| Chunk::Empty).collect(),
            file,
            tier: 1,
            raw_chunks: 0,
            compressed_chunks: 0,
            compressed_bytes: 0,
        };
        // Reserve the first step now: an unwritable directory or a full disk
        // shows up at construction, not at the first add.
        if r.file.is_some() {
            r.reserve(1.min(len))?;
        }
        Ok(r)
    }

    /// Puts this region in compression tier 2 (see the field docs).
    pub(crate) fn second_tier(mut self) -> Self {
        self.tier = 2;
        self
    }

    pub(crate) fn tier(&self) -> u8 {
        self.tier
    }

    /// Logical length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_file_backed(&self) -> bool {
        self.file.is_some()
    }

    pub(crate) fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    pub(crate) fn chunk_count(&self) -> usize {
        self.states.len()
    }

    pub(crate) fn chunk_of(&self, byte: usize) -> usize {
        byte >> self.shift
    }

    pub(crate) fn state(&self, chunk: usize) -> &Chunk {
        &self.states[chunk]
    }

    /// Makes sure the file backing covers bytes `..end` (no-op for anonymous
    /// memory). Fails with a typed error and changes nothing on a full disk.
    pub(crate) fn reserve(&mut self, end: usize) -> Result<()> {
        let map_len = self.map.len() as u64;
        let Some(fb) = self.file.as_mut() else {
            return Ok(());
        };
        let end = end as u64;
        if end <= fb.reserved {
            return Ok(());
        }
        let target = end
            .div_ceil(fb.step)
            .saturating_mul(fb.step)
            .min(map_len)
            .max(end);
        let (off, add) = (fb.reserved, target - fb.reserved);
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a file descriptor we own; the offsets are
        // within i64 range because they are bounded by the map length.
        let rc = unsafe {
            libc::posix_fallocate(fb.file.as_raw_fd(), off as libc::off_t, add as libc::off_t)
        };
        if rc != 0 {
            return Err(Error::Storage {
                action: "reserve disk space in",
                path: fb.dir.clone(),
                bytes: target,
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        fb.reserved = target;
        Ok(())
    }

    /// Prepares bytes `off..off+len` for writing: reserves file space and
    /// brings compressed chunks back to raw form. After `Ok`, [`write`] on
    /// the range cannot fail.
    pub(crate) fn prepare_write(
        &mut self,
        off: usize,
        len: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        if len == 0 || (self.file.is_none() && self.compressed_chunks == 0) {
            return Ok(());
        }
        self.reserve(off + len)?;
        for c in self.chunk_of(off)..=self.chunk_of(off + len - 1) {
            if matches!(self.states[c], Chunk::Compressed { .. }) {
                self.decompress_in_place(c, scratch)?;
            }
        }
        Ok(())
    }

    fn decompress_in_place(&mut self, c: usize, scratch: &mut Vec<u8>) -> Result<()> {
        let cb = self.chunk_bytes;
        scratch.resize(cb, 0);
        let Chunk::Compressed { data, .. } = &self.states[c] else {
            return Ok(());
        };
        let dst = &mut self.map[c * cb..(c + 1) * cb];
        codec::decompress_into(data, self.elem, scratch, dst)
            .map_err(|reason| Error::Codec { chunk: c, reason })?;
        self.compressed_bytes -= data.len();
        self.compressed_chunks -= 1;
        self.raw_chunks += 1;
        self.states[c] = Chunk::Raw {
            incompressible: false,
        };
        Ok(())
    }

    /// Writes `src` at `off`. The range must have been prepared (see
    /// [`prepare_write`]); compressed chunks in it are a logic error.
    #[inline]
    pub(crate) fn write(&mut self, off: usize, src: &[u8]) {
        if src.is_empty() {
            return;
        }
        let (first, last) = (self.chunk_of(off), self.chunk_of(off + src.len() - 1));
        if first == last
            && matches!(
                self.states[first],
                Chunk::Raw {
                    incompressible: false
                }
            )
        {
            self.map[off..off + src.len()].copy_from_slice(src);
            return;
        }
        for c in first..=last {
            match self.states[c] {
                Chunk::Raw {
                    incompressible: false,
                } => {}
                Chunk::Raw { .. } => {
                    self.states[c] = Chunk::Raw {
                        incompressible: false,
                    }
                }
                Chunk::Empty => {
                    self.states[c] = Chunk::Raw {
                        incompressible: false,
                    };
                    self.raw_chunks += 1;
                }
                Chunk::Compressed { .. } => {
                    debug_assert!(false, "write into a compressed chunk without prepare_write");
                }
            }
        }
        self.map[off..off + src.len()].copy_from_slice(src);
    }

    /// The bytes `off..off+len` if they are all resident (no decompression
    /// needed), for zero-copy comparisons on the write path.
    pub(crate) fn raw_slice(&self, off: usize, len: usize) -> Option<&[u8]> {
        if len == 0 {
            return Some(&[]);
        }
        if self.compressed_chunks > 0 {
            let all_raw = (self.chunk_of(off)..=self.chunk_of(off + len - 1))
                .all(|c| matches!(self.states[c], Chunk::Raw { .. }));
            if !all_raw {
                return None;
            }
        }
        Some(&self.map[off..off + len])
    }

    /// Copies `off..off+dst.len()` into `dst`, decompressing through `cache`.
    #[inline]
    pub(crate) fn read(&self, off: usize, dst: &mut [u8], cache: &mut ReadCache) -> Result<()> {
        if self.compressed_chunks == 0 {
            dst.copy_from_slice(&self.map[off..off + dst.len()]);
            return Ok(());
        }
        self.read_slow(off, dst, cache)
    }

    fn read_slow(&self, mut off: usize, mut dst: &mut [u8], cache: &mut ReadCache) -> Result<()> {
        let cb = self.chunk_bytes;
        while !dst.is_empty() {
            let c = self.chunk_of(off);
            let in_chunk = off - c * cb;
            let n = dst.len().min(cb - in_chunk);
            let (head, rest) = dst.split_at_mut(n);
            match &self.states[c] {
                Chunk::Compressed { data, gen } => {
                    let bytes = cache
                        .get(*gen, data, self.elem, cb)
                        .map_err(|reason| Error::Codec { chunk: c, reason })?;
                    head.copy_from_slice(&bytes[in_chunk..in_chunk + n]);
                }
                _ => head.copy_from_slice(&self.map[off..off + n]),
            }
            dst = rest;
            off += n;
        }
        Ok(())
    }

    /// Compresses chunk `c` if it is raw, not already found incompressible,
    /// and anonymous. Returns resident bytes saved (0 if nothing was done).
    pub(crate) fn compress_chunk(&mut self, c: usize, scratch: &mut Scratch) -> usize {
        if self.file.is_some()
            || !matches!(
                self.states[c],
                Chunk::Raw {
                    incompressible: false
                }
            )
        {
            return 0;
        }
        let cb = self.chunk_bytes;
        match codec::compress(&self.map[c * cb..(c + 1) * cb], self.elem, scratch) {
            None => {
                self.states[c] = Chunk::Raw {
                    incompressible: true,
                };
                0
            }
            Some(data) => {
                let saved = cb - data.len();
                self.compressed_bytes += data.len();
                self.compressed_chunks += 1;
                self.raw_chunks -= 1;
                self.states[c] = Chunk::Compressed {
                    data,
                    gen: NEXT_GEN.fetch_add(1, Ordering::Relaxed),
                };
                self.drop_pages(c);
                saved
            }
        }
    }

    /// Forgets chunk `c` (its contents are dead): releases its pages or its
    /// compressed image. Returns resident bytes freed.
    pub(crate) fn release_chunk(&mut self, c: usize) -> usize {
        match std::mem::replace(&mut self.states[c], Chunk::Empty) {
            Chunk::Empty => 0,
            Chunk::Raw { .. } => {
                self.raw_chunks -= 1;
                self.drop_pages(c);
                self.chunk_bytes
            }
            Chunk::Compressed { data, .. } => {
                self.compressed_chunks -= 1;
                self.compressed_bytes -= data.len();
                data.len()
            }
        }
    }

    /// Forgets chunks `first..end` (all dead) with one `madvise` for the
    /// whole span. Returns resident bytes freed.
    pub(crate) fn release_run(&mut self, first: usize, end: usize) -> usize {
        let mut freed = 0;
        let mut any_raw = false;
        for c in first..end {
            match std::mem::replace(&mut self.states[c], Chunk::Empty) {
                Chunk::Empty => {}
                Chunk::Raw { .. } => {
                    self.raw_chunks -= 1;
                    freed += self.chunk_bytes;
                    any_raw = true;
                }
                Chunk::Compressed { data, .. } => {
                    self.compressed_chunks -= 1;
                    self.compressed_bytes -= data.len();
                    freed += data.len();
                }
            }
        }
        if any_raw {
            let cb = self.chunk_bytes;
            // SAFETY: as in `drop_pages`, for a chunk-aligned span inside the map.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    first * cb,
                    (end - first) * cb,
                )
            };
        }
        freed
    }

    fn drop_pages(&mut self, c: usize) {
        let cb = self.chunk_bytes;
        // SAFETY: the range is inside the map and chunk-aligned (page-aligned).
        // For anonymous private maps MADV_DONTNEED makes later reads return
        // zeros, which is fine: the chunk is marked Empty or Compressed, so
        // its map bytes are never read as data again before a write. For a
        // shared file map the page cache keeps the data.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, c * cb, cb)
        };
    }

    /// Drops every chunk (contents become meaningless).
    pub(crate) fn release_all(&mut self) {
        for c in 0..self.states.len() {
            self.release_chunk(c);
        }
    }

    /// The map bytes of chunk `c` (meaningful when it is raw).
    pub(crate) fn chunk_raw(&self, c: usize) -> &[u8] {
        let cb = self.chunk_bytes;
        &self.map[c * cb..(c + 1) * cb]
    }

    /// Loads chunk `c` (currently empty) from raw bytes.
    pub(crate) fn load_raw_chunk(&mut self, c: usize, bytes: &[u8]) -> Result<()> {
        let cb = self.chunk_bytes;
        self.reserve((c + 1) * cb)?;
        self.release_chunk(c);
        self.map[c * cb..(c + 1) * cb].copy_from_slice(bytes);
        self.states[c] = Chunk::Raw {
            incompressible: false,
        };
        self.raw_chunks += 1;
        Ok(())
    }

    /// Loads chunk `c` from a compressed image, checking it decompresses.
    pub(crate) fn load_compressed_chunk(
        &mut self,
        c: usize,
        data: Box<[u8]>,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let cb = self.chunk_bytes;
        scratch.resize(2 * cb, 0);
        let (tmp, out) = scratch.split_at_mut(cb);
        codec::decompress_into(&data, self.elem, tmp, out)
            .map_err(|reason| Error::Codec { chunk: c, reason })?;
        self.release_chunk(c);
        self.compressed_bytes += data.len();
        self.compressed_chunks += 1;
        self.states[c] = Chunk::Compressed {
            data,
            gen: NEXT_GEN.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }

    /// Resident bytes in raw chunks not yet found incompressible.
    pub(crate) fn compressible_raw_bytes(&self) -> usize {
        self.states
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Chunk::Raw {
                        incompressible: false
                    }
                )
            })
            .count()
            * self.chunk_bytes
    }

    /// Resident bytes of the map (raw chunks).
    pub(crate) fn resident_bytes(&self) -> usize {
        self.raw_chunks * self.chunk_bytes
    }

    /// Heap bytes: compressed images plus the chunk table.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.compressed_bytes + self.states.capacity() * std::mem::size_of::<Chunk>()
    }

    pub(crate) fn compressed_chunks(&self) -> usize {
        self.compressed_chunks
    }

    pub(crate) fn compressed_bytes(&self) -> usize {
        self.compressed_bytes
    }

    /// Mapped length (address space reserved).
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn backing_dir(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.dir.as_path())
    }
}

/// A small LRU of decompressed chunk images, owned by a reader (a batch), so
/// sampling through `&self` never allocates once the cache is warm.
#[derive(Debug)]
pub(crate) struct ReadCache {
    entries: Vec<CacheEntry>,
    capacity: usize,
    tick: u64,
    tmp: Vec<u8>,
    hits: u64,
    misses: u64,
}

#[derive(Debug)]
struct CacheEntry {
    gen: u64,
    last: u64,
    data: Box<[u8]>,
}

impl Default for ReadCache {
    fn default() -> Self {
        Self::new(32)
    }
}

impl ReadCache {
    /// A cache of up to `capacity` decompressed chunks.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity: capacity.max(1),
            tick: 0,
            tmp: Vec::new(),
            hits: 0,
            misses: 0,
        }
    }

    fn get(&mut self, gen: u64, src: &[u8], elem: usize, cb: usize) -> Result<&[u8], String> {
        self.tick += 1;
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.gen == gen && e.data.len() == cb)
        {
            self.hits += 1;
            self.entries[i].last = self.tick;
            return Ok(&self.entries[i].data);
        }
        self.misses += 1;
        let i = if self.entries.len() < self.capacity {
            self.entries.push(CacheEntry {
                gen: 0,
                last: 0,
                data: vec![0; cb].into_boxed_slice(),
            });
            self.entries.len() - 1
        } else {
            let (i, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last)
                .expect("capacity >= 1");
            if self.entries[i].data.len() != cb {
                self.entries[i].data = vec![0; cb].into_boxed_slice();
            }
            i
        };
        self.tmp.resize(cb, 0);
        let e = &mut self.entries[i];
        e.gen = 0; // invalid until the decompression succeeds
        codec::decompress_into(src, elem, &mut self.tmp, &mut e.data)?;
        e.gen = gen;
        e.last = self.tick;
        Ok(&e.data)
    }

    /// (hits, misses) since creation.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Heap bytes held by the cache.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.data.len()).sum::<usize>() + self.tmp.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CB: usize = 4096;

    #[test]
    fn writes_reads_and_accounts_resident_chunks() {
        let mut r = Region::new(10 * CB + 100, 4, CB, &Backing::Anon).unwrap();
        assert_eq!(r.chunk_count(), 11);
        assert_eq!(r.resident_bytes(), 0);
        let data: Vec<u8> = (0..3 * CB).map(|i| (i % 251) as u8).collect();
        let mut sc = Vec::new();
        r.prepare_write(CB / 2, data.len(), &mut sc).unwrap();
        r.write(CB / 2, &data);
        assert_eq!(r.resident_bytes(), 4 * CB); // touches chunks 0..=3
        let mut out = vec![0; data.len()];
        r.read(CB / 2, &mut out, &mut ReadCache::default()).unwrap();
        assert_eq!(out, data);
        assert_eq!(r.release_chunk(3), CB);
        assert_eq!(r.resident_bytes(), 3 * CB);
    }

    #[test]
    fn compressed_chunks_read_back_exactly_and_return_on_write() {
        let mut r = Region::new(8 * CB, 4, CB, &Backing::Anon).unwrap();
        let vals: Vec<f32> = (0..8 * CB / 4)
            .map(|i| 100.0 + (i as f32 * 0.01).sin())
            .collect();
        let bytes: &[u8] = bytemuck::cast_slice(&vals);
        let mut sc = Vec::new();
        r.prepare_write(0, bytes.len(), &mut sc).unwrap();
        r.write(0, bytes);
        let mut scratch = Scratch::default();
        let saved: usize = (0..6).map(|c| r.compress_chunk(c, &mut scratch)).sum();
        assert!(saved > 0);
        assert_eq!(r.compressed_chunks(), 6);
        assert_eq!(r.resident_bytes(), 2 * CB);
        // a read spanning compressed and raw chunks
        let mut out = vec![0u8; 3 * CB];
        let mut cache = ReadCache::new(2);
        r.read(5 * CB - 10, &mut out, &mut cache).unwrap();
        assert_eq!(&out[..], &bytes[5 * CB - 10..8 * CB - 10]);
        assert!(r.raw_slice(0, 10).is_none());
        // writing into a compressed chunk first brings it back
        r.prepare_write(CB + 8, 4, &mut sc).unwrap();
        r.write(CB + 8, &[1, 2, 3, 4]);
        assert_eq!(r.compressed_chunks(), 5);
        let mut all = vec![0u8; 8 * CB];
        r.read(0, &mut all, &mut cache).unwrap();
        let mut expect = bytes.to_vec();
        expect[CB + 8..CB + 12].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(all, expect);
    }

    #[test]
    fn file_backed_region_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Region::new(4 * CB, 8, CB, &Backing::File(dir.path().to_owned())).unwrap();
        assert!(r.is_file_backed());
        let data = vec![7u8; 4 * CB];
        let mut sc = Vec::new();
        r.prepare_write(0, data.len(), &mut sc).unwrap();
        r.write(0, &data);
        let mut out = vec![0; 4 * CB];
        r.read(0, &mut out, &mut ReadCache::default()).unwrap();
        assert_eq!(out, data);
        assert_eq!(
            r.compress_chunk(0, &mut Scratch::default()),
            0,
            "file-backed chunks stay raw"
        );
    }

    #[test]
    fn unwritable_directory_is_a_typed_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let not_a_dir = f.path().join("sub");
        let e = Region::new(CB, 1, CB, &Backing::File(not_a_dir)).unwrap_err();
        assert!(matches!(e, Error::Storage { .. }), "{e}");
    }
}
