//! `bench-images`: images per second for the `images` job's CPU work on a
//! 2000x1500 JPEG: decode (with the limits), resize to `medium` (512x384) and
//! `thumb` (128x96), encode both (JPEG, quality 85). Storage and the database are
//! left out: this is the part that bounds a worker.
//!
//! `cargo run --release -p scaleshop-media --bin bench-images -- [RUNS] [IMAGES_PER_RUN]`
//!
//! Prints the median over RUNS runs (default 7) of IMAGES_PER_RUN images each
//! (default 20), on one thread, then with one thread per core (what
//! `images_concurrency` = cores gives).

#![allow(
    clippy::expect_used,
    reason = "a benchmark program: failing loudly is right"
)]

use std::io::Cursor;
use std::time::Instant;

use image::imageops::FilterType;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};

/// A photograph-like 2000x1500 JPEG: smooth gradients plus fine noise.
fn sample() -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let image = DynamicImage::ImageRgb8(ImageBuffer::from_fn(2000, 1500, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state & 0x1F) as u32;
        let r = (x * 255 / 2000 + noise) as u8;
        let g = (y * 255 / 1500 + noise / 2) as u8;
        let b = (((x + y) / 14) % 256) as u8;
        Rgb([r, g, b])
    }));
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Jpeg)
        .expect("encode the sample");
    out.into_inner()
}

/// CPU seconds used by this process so far (user + system), from /proc; `None`
/// where there is no /proc.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((utime + stime) / 100.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Images per second (wall clock) of `threads` threads each rendering
/// `per_thread` images, and CPU milliseconds per image.
fn run(bytes: &[u8], threads: usize, per_thread: usize) -> (f64, f64) {
    let started = Instant::now();
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..per_thread {
                    let rendered = scaleshop_media::process::render(bytes).expect("render");
                    assert_eq!(rendered.variants.len(), 2);
                }
            });
        }
    });
    let images = (threads * per_thread) as f64;
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu_before;
    (
        images / started.elapsed().as_secs_f64(),
        1000.0 * cpu / images,
    )
}

/// Milliseconds to resize the decoded sample to 512x384 with `filter` (median of 5).
fn resize_ms(image: &DynamicImage, filter: FilterType) -> f64 {
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            let resized = image.resize_exact(512, 384, filter);
            assert_eq!(resized.width(), 512);
            1000.0 * started.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let per_run: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let bytes = sample();
    let rendered = scaleshop_media::process::render(&bytes).expect("render");
    let sizes: Vec<String> = rendered
        .variants
        .iter()
        .map(|v| {
            format!(
                "{} {}x{} {} ({} bytes)",
                v.name,
                v.width,
                v.height,
                v.media_type.as_str(),
                v.bytes.len()
            )
        })
        .collect();
    println!(
        "input: 2000x1500 JPEG, {} bytes -> {}",
        bytes.len(),
        sizes.join(", ")
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    for threads in [1, cores] {
        // One warm-up run, then the measured ones.
        run(&bytes, threads, 2);
        let results: Vec<(f64, f64)> = (0..runs)
            .map(|_| run(&bytes, threads, per_run.div_ceil(threads)))
            .collect();
        let rates: Vec<f64> = results.iter().map(|r| r.0).collect();
        let cpu = median(results.iter().map(|r| r.1).collect());
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        println!(
            "threads {threads}: median {:.1} images/s over {runs} runs (min {min:.1}, max {max:.1}); \
             {cpu:.1} CPU ms/image",
            median(rates),
        );
        if cores == 1 {
            break;
        }
    }
    let (_, decoded) = scaleshop_media::process::decode(&bytes).expect("decode");
    let decode_ms = median(
        (0..5)
            .map(|_| {
                let started = Instant::now();
                scaleshop_media::process::decode(&bytes).expect("decode");
                1000.0 * started.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!("decode alone: {decode_ms:.1} ms");
    for (name, filter) in [
        ("Triangle", FilterType::Triangle),
        ("CatmullRom (used)", FilterType::CatmullRom),
        ("Lanczos3", FilterType::Lanczos3),
    ] {
        println!(
            "resize 2000x1500 -> 512x384, {name}: {:.1} ms",
            resize_ms(&decoded, filter)
        );
    }
}
