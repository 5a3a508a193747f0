//! Storage failures are typed errors that lose nothing: a full disk (file
//! size limit) at construction and at growth, an unwritable directory, and
//! file-backed storage giving the same results as memory.
//!
//! The disk-full cases lower RLIMIT_FSIZE for the whole process, so they
//! live in this binary's single test.

use gm_buffers::{col, BufferConfig, DType, Error, FieldSpec, ReplayBuffer, Schema, StorageMode};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const D: usize = 1024; // 4 KiB of f32 per transition

fn schema() -> Schema {
    Schema::new(vec![
        FieldSpec::plain("x", DType::F32, &[D]),
        FieldSpec::plain("id", DType::I64, &[]),
    ])
    .unwrap()
}

fn file_config(dir: &std::path::Path, capacity: usize) -> BufferConfig {
    BufferConfig {
        storage: StorageMode::File,
        storage_dir: Some(dir.to_owned()),
        ..BufferConfig::with_capacity(capacity)
    }
}

fn payload(id: i64) -> Vec<f32> {
    (0..D).map(|i| id as f32 * 0.5 + i as f32).collect()
}

/// Every live transition still holds exactly what was added.
fn verify(buf: &ReplayBuffer, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let b = buf.sample(64, &mut rng).unwrap();
    for i in 0..b.len() {
        let id = b.item::<i64>("id", i).unwrap()[0];
        assert_eq!(
            b.item::<f32>("x", i).unwrap(),
            &payload(id)[..],
            "transition {id} changed"
        );
    }
}

fn set_fsize_limit(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls; SIGXFSZ is ignored so exceeding the limit is an
    // EFBIG error instead of a signal that kills the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

#[test]
fn storage_failures_are_typed_errors_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();

    // An unwritable directory (a path under a regular file) fails at construction.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = ReplayBuffer::new(schema(), file_config(&file.join("sub"), 100)).unwrap_err();
    assert!(matches!(e, Error::Storage { .. }), "{e}");
    assert!(
        e.to_string().contains("a-file"),
        "the error names the directory: {e}"
    );

    // File-backed storage gives the same samples as memory.
    let mut mem = ReplayBuffer::new(schema(), BufferConfig::with_capacity(300)).unwrap();
    let mut fil = ReplayBuffer::new(schema(), file_config(dir.path(), 300)).unwrap();
    assert!(fil.stats().file_dir.is_some() && mem.stats().file_dir.is_none());
    for id in 0..500i64 {
        let x = payload(id);
        mem.add(&[col(&x), col(&[id])]).unwrap();
        fil.add(&[col(&x), col(&[id])]).unwrap();
    }
    let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(9), ChaCha8Rng::seed_from_u64(9));
    let (a, b) = (
        mem.sample(128, &mut r1).unwrap(),
        fil.sample(128, &mut r2).unwrap(),
    );
    assert_eq!(a.get::<f32>("x").unwrap(), b.get::<f32>("x").unwrap());
    assert_eq!(a.get::<i64>("id").unwrap(), b.get::<i64>("id").unwrap());
    drop((mem, fil));

    // Disk full. Capacity 4000 x 4 KiB = 16 MiB in the `x` file, reserved in
    // steps of 2 MiB; the limit allows 6 MiB.
    set_fsize_limit(6 << 20);
    let e = ReplayBuffer::new(
        schema(),
        BufferConfig {
            chunk_bytes: 16 << 20,
            ..file_config(dir.path(), 8000)
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Storage { .. }),
        "a first reservation beyond the limit fails at construction: {e}"
    );

    let mut buf = ReplayBuffer::new(schema(), file_config(dir.path(), 4000)).unwrap();
    let mut id = 0i64;
    let err = loop {
        let x = payload(id);
        match buf.add(&[col(&x), col(&[id])]) {
            Ok(_) => id += 1,
            Err(e) => break e,
        }
        assert!(id < 4000, "the file limit was never hit");
    };
    assert!(matches!(err, Error::Storage { .. }), "{err}");
    assert!(err.to_string().contains("reserve"), "{err}");
    assert_eq!(
        buf.len() as i64,
        id,
        "the rejected transition is not stored, the others are"
    );
    verify(&buf, 1);
    // The same transition is rejected again, still without a crash.
    let x = payload(id);
    assert!(buf.add(&[col(&x), col(&[id])]).is_err());
    assert_eq!(buf.len() as i64, id);

    // A batch that runs out of space part-way reports how many it stored.
    let n = 8;
    let xs: Vec<f32> = (0..n as i64).flat_map(|k| payload(id + k)).collect();
    let ids: Vec<i64> = (id..id + n as i64).collect();
    match buf.add_batch(&[col(&xs), col(&ids)]) {
        Err(Error::BatchInterrupted { added, total, .. }) => {
            assert_eq!(total, n);
            assert_eq!(buf.len() as i64, id + added as i64);
        }
        Err(e) => {
            assert!(matches!(e, Error::Storage { .. }), "{e}");
            assert_eq!(
                buf.len() as i64,
                id,
                "a batch that stores nothing changes nothing"
            );
        }
        Ok(_) => panic!("the batch cannot fit under the file size limit"),
    }
    verify(&buf, 2);

    // Raising the limit lets the same buffer grow again.
    set_fsize_limit(libc::RLIM_INFINITY);
    let before = buf.len();
    let x = payload(999_999);
    buf.add(&[col(&x), col(&[999_999i64])]).unwrap();
    assert_eq!(buf.len(), before + 1);
    verify(&buf, 3);
}
