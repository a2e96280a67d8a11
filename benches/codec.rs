//! Per-frame cost of the codec hot path: G.711 on one 20 ms Twilio frame and resampling
//! one 20 ms frame in each direction, with output buffers reused as the relay does.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use voxrelay::codec::StreamResampler;
use voxrelay::codec::g711::{
    alaw_decode_slice, alaw_encode_slice, mulaw_decode_slice, mulaw_encode_slice,
};

const FRAME_8K: usize = 160;

fn speech_like(rate_hz: u32, len: usize) -> Vec<i16> {
    (0..len)
        .map(|n| {
            let t = n as f64 / f64::from(rate_hz);
            let value = 0.3 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                + 0.1 * (2.0 * std::f64::consts::PI * 2900.0 * t).sin();
            (value * 32767.0) as i16
        })
        .collect()
}

fn g711(c: &mut Criterion) {
    let samples = speech_like(8000, FRAME_8K);
    let mut codes = [0u8; FRAME_8K];
    let mut decoded = [0i16; FRAME_8K];
    mulaw_encode_slice(&samples, &mut codes);

    let mut group = c.benchmark_group("g711_20ms_frame");
    group.throughput(Throughput::Elements(FRAME_8K as u64));
    group.bench_function("mulaw_encode", |b| {
        b.iter(|| mulaw_encode_slice(black_box(&samples), &mut codes))
    });
    group.bench_function("mulaw_decode", |b| {
        b.iter(|| mulaw_decode_slice(black_box(&codes), &mut decoded))
    });
    alaw_encode_slice(&samples, &mut codes);
    group.bench_function("alaw_encode", |b| {
        b.iter(|| alaw_encode_slice(black_box(&samples), &mut codes))
    });
    group.bench_function("alaw_decode", |b| {
        b.iter(|| alaw_decode_slice(black_box(&codes), &mut decoded))
    });
    group.finish();
}

fn resample(c: &mut Criterion) {
    let mut group = c.benchmark_group("resample_20ms_frame");
    for (from_hz, to_hz) in [(8000, 24000), (24000, 8000), (8000, 16000), (16000, 8000)] {
        let frame = speech_like(from_hz, (from_hz / 50) as usize);
        let mut resampler = match StreamResampler::new(from_hz, to_hz) {
            Ok(resampler) => resampler,
            Err(error) => panic!("{from_hz}->{to_hz}: {error}"),
        };
        let mut out = Vec::with_capacity((to_hz / 50) as usize);
        group.throughput(Throughput::Elements(frame.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{from_hz}_to_{to_hz}")),
            &frame,
            |b, frame| {
                b.iter(|| {
                    out.clear();
                    resampler.process(black_box(frame), &mut out);
                    black_box(out.len())
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, g711, resample);
criterion_main!(benches);
