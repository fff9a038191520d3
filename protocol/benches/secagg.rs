//! Secure-aggregation primitives: mask expansion against the raw keystream,
//! Shamir sharing, encoding and packing.
//!
//! `cargo bench -p greyfed-protocol --bench secagg` (a minute or two; short
//! measurement windows, 10 samples each).

use std::{hint::black_box, time::Duration};

use aes::Aes128;
use chacha20::ChaCha12;
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use ctr::{
    Ctr128BE,
    cipher::{KeyIvInit, StreamCipher},
};
use greyfed_protocol::secagg::{
    encode::{EncodingParams, decode, encode, pack, unpack},
    prg::{MaskTerm, PrgKind, add_mask, add_masks, fill_mask, sub_mask},
    shamir::{LagrangeCache, combine, split},
};
use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};

fn short(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
}

/// The raw keystream written straight into a byte buffer: the lower bound.
fn raw_keystream(kind: PrgKind, seed: &[u8; 32], out: &mut [u8]) {
    match kind {
        PrgKind::Aes128Ctr => {
            let (halves, _) = seed.as_chunks::<16>();
            let mut c = Ctr128BE::<Aes128>::new(&halves[0].into(), &halves[1].into());
            c.write_keystream(out);
        }
        PrgKind::ChaCha12 => {
            let mut c = ChaCha12::new(seed.into(), &[0u8; 12].into());
            c.write_keystream(out);
        }
    }
}

fn prg(c: &mut Criterion) {
    let seed = [7u8; 32];
    for kind in [PrgKind::Aes128Ctr, PrgKind::ChaCha12] {
        for d in [100_000usize, 1_000_000] {
            let mut group = c.benchmark_group(format!("prg/{kind:?}/{d}"));
            short(&mut group);
            group.throughput(Throughput::Bytes(4 * d as u64));
            let mut bytes = vec![0u8; 4 * d];
            group.bench_function("raw_keystream", |b| {
                b.iter(|| raw_keystream(kind, black_box(&seed), &mut bytes))
            });
            let mut words = vec![0u32; d];
            group.bench_function("fill_mask", |b| {
                b.iter(|| fill_mask(kind, black_box(&seed), &mut words))
            });
            group.bench_function("add_mask", |b| {
                b.iter(|| add_mask(kind, black_box(&seed), &mut words))
            });
            group.bench_function("sub_mask", |b| {
                b.iter(|| sub_mask(kind, black_box(&seed), &mut words))
            });
            group.finish();
        }
    }
}

/// A participant's whole mask in the 10 × 10 MNIST run: its self mask and
/// nine pairwise masks over the blocknet update (406,000 words), one stream
/// after another against all ten streams chunk by chunk.
fn masks(c: &mut Criterion) {
    let d = 406_000;
    let seeds: Vec<[u8; 32]> = (0..10u8).map(|t| [t; 32]).collect();
    let kind = PrgKind::fastest();
    let mut group = c.benchmark_group(format!("masks/{kind:?}/10x{d}"));
    short(&mut group);
    group.throughput(Throughput::Bytes(10 * 4 * d as u64));
    let mut words = vec![0u32; d];
    group.bench_function("one_by_one", |b| {
        b.iter(|| {
            for (t, seed) in seeds.iter().enumerate() {
                if t % 2 == 0 {
                    add_mask(kind, black_box(seed), &mut words);
                } else {
                    sub_mask(kind, black_box(seed), &mut words);
                }
            }
        })
    });
    let terms: Vec<MaskTerm<'_>> = seeds
        .iter()
        .enumerate()
        .map(|(t, seed)| MaskTerm {
            seed,
            add: t % 2 == 0,
        })
        .collect();
    group.bench_function("fused", |b| {
        b.iter(|| add_masks(kind, black_box(&terms), &mut words))
    });
    group.finish();
}

fn shamir(c: &mut Criterion) {
    let (t, k) = (50usize, 100u64);
    let mut rng = StdRng::seed_from_u64(1);
    let xs: Vec<u64> = (1..=k).collect();
    let secret = [0x5au8; 32];
    let shares = split(&secret, t, &xs, &mut rng).expect("valid parameters");
    let mut group = c.benchmark_group("shamir/t50_k100");
    short(&mut group);
    group.bench_function("split", |b| {
        b.iter(|| split(black_box(&secret), t, &xs, &mut rng))
    });
    let mut cache = LagrangeCache::new();
    group.bench_function("combine_cached", |b| {
        b.iter(|| combine(black_box(&shares), t, &mut cache))
    });
    group.bench_function("combine_uncached", |b| {
        b.iter(|| combine(black_box(&shares), t, &mut LagrangeCache::new()))
    });
    group.finish();
}

fn packing(c: &mut Criterion) {
    let d = 1_000_000usize;
    let mut rng = StdRng::seed_from_u64(2);
    for bits in [20u32, 32] {
        let mask = if bits == 32 {
            u32::MAX
        } else {
            (1 << bits) - 1
        };
        let values: Vec<u32> = (0..d).map(|_| rng.next_u32() & mask).collect();
        let packed = pack(&values, bits);
        let mut group = c.benchmark_group(format!("pack/m{bits}/1M"));
        short(&mut group);
        group.throughput(Throughput::Elements(d as u64));
        group.bench_function("pack", |b| b.iter(|| pack(black_box(&values), bits)));
        group.bench_function("unpack", |b| b.iter(|| unpack(black_box(&packed), bits, d)));
        group.finish();
    }
}

fn encoding(c: &mut Criterion) {
    let d = 1_000_000usize;
    let mut rng = StdRng::seed_from_u64(3);
    let params = EncodingParams::new(1.0, 16, 64, 100).expect("fits the ring");
    let update: Vec<f32> = (0..d).map(|_| rng.random_range(-1.5f32..1.5)).collect();
    let encoded = encode(&params, &update, 3, &mut rng).expect("valid update");
    let mut group = c.benchmark_group("encode/b16/1M");
    short(&mut group);
    group.throughput(Throughput::Elements(d as u64));
    group.bench_function("encode", |b| {
        b.iter(|| encode(&params, black_box(&update), 3, &mut rng))
    });
    group.bench_function("decode", |b| {
        b.iter(|| decode(&params, black_box(&encoded)))
    });
    group.finish();
}

criterion_group!(benches, prg, masks, shamir, packing, encoding);
criterion_main!(benches);
