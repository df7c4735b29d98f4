//! The fuzzing harness: seed inputs from `tests/fuzz/corpus/`, a proptest
//! strategy that mutates them byte by byte (or makes bytes from nothing),
//! and a runner that keeps generating cases until its time budget is spent.
//!
//! `PRETEXT_FUZZ_SECS` sets the budget of each target (30 s by default) and
//! `PRETEXT_FUZZ_SEED` the seed (1 by default, so that a run is repeatable).
//! A failing case is shrunk and printed with the seed and round to replay it.

use std::fmt::Debug;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// The seed inputs of `target`, in file-name order.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", folder.display());
    seeds
}

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBits {
        at: Index,
        mask: u8,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Remove {
        at: Index,
        len: usize,
    },
    Truncate {
        at: Index,
    },
    /// Copies a stretch of the input over another place in it.
    Copy {
        from: Index,
        to: Index,
        len: usize,
    },
    /// Writes a boundary value (a length or size field's favourite lie).
    Word {
        at: Index,
        word: u32,
        big_endian: bool,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let word = prop::sample::select(vec![
        0u32,
        1,
        0x7f,
        0xff,
        0xffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
    ]);
    prop_oneof![
        4 => (any::<Index>(), 1..=255u8).prop_map(|(at, mask)| Mutation::FlipBits { at, mask }),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<Index>(), 1..64usize).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<Index>(), any::<Index>(), 1..64usize)
            .prop_map(|(from, to, len)| Mutation::Copy { from, to, len }),
        2 => (any::<Index>(), word, any::<bool>())
            .prop_map(|(at, word, big_endian)| Mutation::Word { at, word, big_endian }),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for edit in mutations {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len();
        match edit {
            Mutation::FlipBits { at, mask } => bytes[at.index(n)] ^= mask,
            Mutation::Insert { at, bytes: new } => {
                let at = at.index(n + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Remove { at, len } => {
                let at = at.index(n);
                bytes.drain(at..(at + len).min(n));
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(n)),
            Mutation::Copy { from, to, len } => {
                let (from, to) = (from.index(n), to.index(n));
                let len = (*len).min(n - from).min(n - to);
                bytes.copy_within(from..from + len, to);
            }
            Mutation::Word {
                at,
                word,
                big_endian,
            } => {
                let raw = if *big_endian {
                    word.to_be_bytes()
                } else {
                    word.to_le_bytes()
                };
                let at = at.index(n);
                for (i, b) in raw.iter().enumerate().take(n - at) {
                    bytes[at + i] = *b;
                }
            }
        }
    }
    bytes
}

/// Inputs made from `seeds`: mostly a seed with up to eight edits, now and
/// then bytes from nothing.
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        9 => (prop::sample::select(seeds), prop::collection::vec(mutation(), 0..8))
            .prop_map(|(seed, edits)| apply(seed, &edits)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
        Err(_) => default,
    }
}

/// What a parser made of one input, for the run's tally: a fuzzer whose
/// inputs were all refused would not reach the code past the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Refused,
}

/// Runs `property` on cases from `strategy`, in rounds of `round_cases`,
/// until the target's time budget is spent; panics with the shrunk input
/// on the first failure (a panic inside `property` counts as one). Prints
/// how many cases ran and how many inputs were accepted.
pub fn fuzz<S>(
    target: &str,
    round_cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<Verdict, TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let budget = Duration::from_secs_f64(env_or("PRETEXT_FUZZ_SECS", 30.0));
    let seed: u64 = env_or("PRETEXT_FUZZ_SEED", 1);
    let target_key = target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let (ran, accepted) = (AtomicU64::new(0), AtomicU64::new(0));
    let counted = |value: S::Value| {
        let verdict = property(value)?;
        ran.fetch_add(1, Ordering::Relaxed);
        if verdict == Verdict::Accepted {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    let started = Instant::now();
    let mut round = 0u64;
    loop {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&round.to_le_bytes());
        key[16..24].copy_from_slice(&target_key.to_le_bytes());
        let config = Config {
            cases: round_cases,
            failure_persistence: None,
            max_shrink_time: 120_000,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        if let Err(failure) = runner.run(&strategy, counted) {
            panic!("fuzz {target}: {failure}\nreplay: PRETEXT_FUZZ_SEED={seed} (round {round})");
        }
        round += 1;
        if started.elapsed() >= budget {
            break;
        }
    }
    let (ran, accepted) = (ran.into_inner(), accepted.into_inner());
    eprintln!(
        "fuzz {target}: {ran} cases in {:.1} s, {accepted} accepted, no failure (seed {seed})",
        started.elapsed().as_secs_f64()
    );
    assert!(
        accepted > 0,
        "fuzz {target}: no input was accepted; the seeds no longer reach past the checks"
    );
}
