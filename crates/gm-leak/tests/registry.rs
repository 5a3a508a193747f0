//! [`gm_leak::Registry`]: live counts by label follow drops, and stay
//! consistent under concurrent tracking and dropping.

use std::sync::Arc;
use std::thread;

use gm_leak::Registry;

#[test]
fn dropped_objects_disappear_from_counts() {
    let r = Registry::new();
    let a: Vec<Arc<String>> = (0..5).map(|i| Arc::new(i.to_string())).collect();
    let b = Arc::new([0u8; 32]);
    for x in &a {
        r.track("strings", x);
    }
    r.track("arrays", &b);
    let snap = r.snapshot();
    assert_eq!(snap["strings"], 5);
    assert_eq!(snap["arrays"], 1);

    let clone = Arc::clone(&b);
    drop(b);
    assert_eq!(r.live("arrays"), 1, "alive while a strong reference exists");
    drop(clone);
    drop(a);
    let snap = r.snapshot();
    assert_eq!(
        (snap["strings"], snap["arrays"]),
        (0, 0),
        "labels stay, at 0"
    );
    assert_eq!(r.live("never seen"), 0);
}

#[test]
fn guards_and_tracked_objects_add_up() {
    let r = Registry::new();
    let obj = Arc::new(1u32);
    r.track("mixed", &obj);
    let g = r.guard("mixed");
    assert_eq!(r.live("mixed"), 2);
    drop(g);
    drop(obj);
    assert_eq!(r.live("mixed"), 0);
}

/// Eight threads each track 1000 objects and keep every fourth: the counts
/// are exact once they are done, whatever the interleaving.
#[test]
fn concurrent_tracking_is_consistent() {
    let r = Arc::new(Registry::new());
    let kept: Vec<Vec<Arc<u64>>> = thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let r = Arc::clone(&r);
                s.spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..1000u64 {
                        let o = Arc::new(i);
                        r.track(if t % 2 == 0 { "even" } else { "odd" }, &o);
                        let _g = r.guard("in flight");
                        if i % 4 == 0 {
                            kept.push(o);
                        }
                        if i % 100 == 0 {
                            let _ = r.snapshot();
                        }
                    }
                    kept
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let snap = r.snapshot();
    assert_eq!(snap["even"], 4 * 250);
    assert_eq!(snap["odd"], 4 * 250);
    assert_eq!(snap["in flight"], 0);
    drop(kept);
    assert_eq!(r.snapshot()["even"], 0);
}
