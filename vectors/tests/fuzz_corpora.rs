//! Replays every committed fuzz corpus and regression input through the fuzz targets' bodies, so
//! `cargo test` catches a regression without a fuzzer.

use std::path::Path;

use vectors::harness::TARGETS;

#[test]
fn every_committed_fuzz_input_replays_without_a_finding() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0usize;
    for (name, target) in TARGETS {
        for dir in ["corpus", "regressions", "seeds"] {
            let d = fuzz.join(dir).join(name);
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries {
                let path = e.expect("readable directory").path();
                let data = std::fs::read(&path).expect("readable file");
                let r = std::panic::catch_unwind(|| target(&data));
                assert!(r.is_ok(), "{name}: {} reproduces a finding", path.display());
                replayed += 1;
            }
        }
    }
    // The corpora are committed: finding none means the replay lost its inputs.
    assert!(
        replayed > 0,
        "no fuzz inputs found under {}",
        fuzz.display()
    );
    eprintln!("replayed {replayed} fuzz inputs");
}
