//! The `skyreels` binary end to end on the bundled tiny weights.

use candle_core::{Device, Tensor};
use skyreels_tests::{copy_tree, fixture, max_abs, tiny_weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `skyreels` with its cache in `home` (the tiny weights unpack there).
fn skyreels(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skyreels"))
        .args(args)
        .env("XDG_CACHE_HOME", home)
        .env_remove("SKYREELS_MODEL")
        .env_remove("SKYREELS_TRANSFORMER")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes an RGB test image.
fn image_file(dir: &Path, name: &str, w: u32, h: u32) -> PathBuf {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

/// `skyreels generate` writing frames to a .safetensors file with more flags; the frames read back.
type Run = dyn Fn(&Path, &[&str]) -> HashMap<String, Tensor>;

/// An end-to-end fixture (`tests/fixtures/CASE.safetensors`, e.g. `pipeline/i2v_cfg`) as a
/// `skyreels generate` run:
/// its image as a PNG, its noise as a `--noise` file and its request as flags. Returns the
/// fixture's tensors and the run.
fn fixture_run(dir: &Path, case: &str) -> (HashMap<String, Tensor>, Box<Run>) {
    fixture_run_as(dir, case, "generate")
}

/// [`fixture_run`] as another subcommand that takes generate's flags (`calibrate-cache`).
fn fixture_run_as(dir: &Path, case: &str, command: &str) -> (HashMap<String, Tensor>, Box<Run>) {
    let path = fixture(&format!("{case}.safetensors"));
    let name = case.replace('/', "_");
    let io = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    // the fixture's input image (uint8 [h, w, 3]) as a PNG, its noise as a --noise file
    let (h, w, _) = io["image"].dims3().unwrap();
    let raw = io["image"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let img = dir.join(format!("{name}.png"));
    image::RgbImage::from_raw(w as u32, h as u32, raw)
        .unwrap()
        .save(&img)
        .unwrap();
    let noise = dir.join(format!("{name}_noise.safetensors"));
    candle_core::safetensors::save(
        &[("latents", io["latents"].clone())].into_iter().collect(),
        &noise,
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let req: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["request"]).unwrap();
    let mut flags = vec![
        command.to_string(),
        "--image".into(),
        img.to_str().unwrap().into(),
        "--noise".into(),
        noise.to_str().unwrap().into(),
    ];
    for key in [
        "prompt",
        "negative_prompt",
        "height",
        "width",
        "num_frames",
        "steps",
        "guidance_scale",
        "embedded_guidance_scale",
    ] {
        // a null negative prompt (no true CFG) is no flag
        if !req[key].is_null() {
            flags.push(format!("--{}", key.replace('_', "-")));
            flags.push(req[key].to_string().trim_matches('"').to_string());
        }
    }
    let home = dir.to_path_buf();
    let run = move |out: &Path, extra: &[&str]| {
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(["--output", out.to_str().unwrap()]);
        args.extend(extra);
        let o = skyreels(&home, &args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        candle_core::safetensors::load(out, &Device::Cpu).unwrap()
    };
    (io, Box::new(run))
}

#[test]
fn noise_file_path_matches_diffusers_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (io, run) = fixture_run(dir.path(), "pipeline/i2v_cfg");
    let got = run(&dir.path().join("frames.safetensors"), &[]);
    let err = max_abs(&got["frames"], &io["frames"]);
    // the same bound and reasoning as the library parity test (tests/tests/pipeline.rs)
    assert!(err <= 5e-4, "max abs error {err:e}");
    // the two true-CFG branches on two (CPU) devices at once: the same frames, bit for bit
    let parallel = run(
        &dir.path().join("parallel.safetensors"),
        &["--device", "cpu:0,cpu:1", "--parallel", "cfg=2"],
    );
    assert_eq!(max_abs(&parallel["frames"], &got["frames"]), 0.0);
    // and over four: each branch's video tokens split over two ranks (the same bound)
    let ulysses = run(
        &dir.path().join("ulysses.safetensors"),
        &[
            "--device",
            "cpu:0,cpu:1,cpu:2,cpu:3",
            "--parallel",
            "cfg=2,ulysses=2",
        ],
    );
    let err = max_abs(&ulysses["frames"], &io["frames"]);
    assert!(err <= 5e-4, "cfg=2,ulysses=2: max abs error {err:e}");
}

/// `--flow-shift 3` on the tiny weights (whose scheduler config says 7) against diffusers with
/// `FlowMatchEulerDiscreteScheduler(shift=3)` (scripts/fixtures/pipeline.py), the same bound.
#[test]
fn flow_shift_flag_matches_diffusers_with_that_shift() {
    let dir = tempfile::tempdir().unwrap();
    let (io, run) = fixture_run(dir.path(), "pipeline/i2v_flow_shift");
    let got = run(
        &dir.path().join("frames.safetensors"),
        &["--flow-shift", "3"],
    );
    let err = max_abs(&got["frames"], &io["frames"]);
    assert!(err <= 5e-4, "max abs error {err:e}");
}

/// `--cfg-gate 0.6` against the CFG-gating reference (tests/tests/pipeline/cfg_gate.rs states the rule;
/// scripts/fixtures/cache.py gate), the same bound.
#[test]
fn cfg_gate_flag_matches_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (io, run) = fixture_run(dir.path(), "pipeline/cfg_gate_none");
    let got = run(
        &dir.path().join("frames.safetensors"),
        &["--cfg-gate", "0.6"],
    );
    let err = max_abs(&got["frames"], &io["frames"]);
    assert!(err <= 5e-4, "max abs error {err:e}");
}

/// `--cache magcache:... --cache-ratios FILE.json` against diffusers' MagCache hook
/// (tests/tests/pipeline/magcache.rs; scripts/fixtures/cache.py magcache), the same bound.
#[test]
fn magcache_flags_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let case = "pipeline/cache_mag_cfg_b";
    let (io, run) = fixture_run(dir.path(), case);
    let bytes = std::fs::read(fixture(&format!("{case}.safetensors"))).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let req: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["request"]).unwrap();
    let ratios = dir.path().join("ratios.json");
    std::fs::write(&ratios, req["cache_ratios"].to_string()).unwrap();
    let got = run(
        &dir.path().join("frames.safetensors"),
        &[
            "--cache",
            req["cache"].as_str().unwrap(),
            "--cache-ratios",
            ratios.to_str().unwrap(),
        ],
    );
    let err = max_abs(&got["frames"], &io["frames"]);
    assert!(err <= 5e-4, "max abs error {err:e}");
    // a bundled name stands for its ratios
    run(
        &dir.path().join("bundled.safetensors"),
        &[
            "--cache",
            "magcache:0.1",
            "--cache-ratios",
            "hunyuanvideo-544p",
        ],
    );
}

/// `skyreels calibrate-cache` against diffusers' MagCache calibration (tests/tests/pipeline/
/// magcache.rs states the 1e-5 tolerance; scripts/fixtures/cache.py calibrate): the ratios file
/// it writes holds each branch's ratios, and the clip is the uncached run's (the same bound).
#[test]
fn calibrate_cache_writes_diffusers_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let case = "pipeline/cache_calibrate_i2v";
    let (io, run) = fixture_run_as(dir.path(), case, "calibrate-cache");
    let bytes = std::fs::read(fixture(&format!("{case}.safetensors"))).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let req: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["request"]).unwrap();
    let ratios = dir.path().join("ratios.json");
    let got = run(
        &dir.path().join("frames.safetensors"),
        &["--ratios", ratios.to_str().unwrap()],
    );
    let err = max_abs(&got["frames"], &io["frames"]);
    assert!(err <= 5e-4, "max abs error {err:e}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ratios).unwrap()).unwrap();
    assert_eq!(written["calibrated"]["steps"], req["steps"]);
    for branch in ["cond", "uncond"] {
        let want = req["mag_ratios"][branch].as_array().unwrap();
        let got = written[branch].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{branch}");
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-5, "{branch}: {g} vs {w}");
        }
    }
    // the file drives MagCache, and a cache in the calibration itself is refused
    let (_, generate) = fixture_run(dir.path(), case);
    generate(
        &dir.path().join("cached.safetensors"),
        &[
            "--cache",
            "magcache:0.1",
            "--cache-ratios",
            ratios.to_str().unwrap(),
        ],
    );
    let img = image_file(dir.path(), "in.png", 64, 48);
    let o = skyreels(
        dir.path(),
        &[
            "calibrate-cache",
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            "p",
            "--height",
            "48",
            "--width",
            "64",
            "--num-frames",
            "5",
            "--cache",
            "teacache:0.1",
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cache: a calibration runs every forward"),
        "{}",
        stderr(&o)
    );
}

/// `--lora PATH:SCALE`, twice, against diffusers with `set_adapters([..], [0.7, -0.3])`
/// (scripts/fixtures/lora.py), the same bound; a refused LoRA file fails the run naming it.
#[test]
fn lora_flags_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (io, run) = fixture_run(dir.path(), "lora/two");
    let file = |name: &str| fixture(&format!("lora/files/{name}"));
    let (a, b) = (file("diffusers.safetensors"), file("hunyuan.safetensors"));
    let (a, b) = (
        format!("{}:0.7", a.display()),
        format!("{}:-0.3", b.display()),
    );
    let got = run(
        &dir.path().join("frames.safetensors"),
        &["--lora", &a, "--lora", &b],
    );
    let err = max_abs(&got["frames"], &io["frames"]);
    assert!(err <= 5e-4, "max abs error {err:e}");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, "not tensors").unwrap();
    let o = skyreels(
        dir.path(),
        &["generate", "--prompt", "x", "--lora", bad.to_str().unwrap()],
    );
    assert!(!o.status.success());
    let msg = stderr(&o);
    assert!(
        msg.contains("LoRA ") && msg.contains("bad.safetensors: not a safetensors file"),
        "{msg}"
    );
    let o = skyreels(
        dir.path(),
        &["generate", "--prompt", "x", "--lora", "a.safetensors:9"],
    );
    let msg = stderr(&o);
    assert!(
        msg.contains("'a.safetensors:9' for '--lora") && msg.contains("scale must be a number"),
        "{msg}"
    );
}

#[test]
fn default_run_writes_an_mp4_and_says_the_weights_are_tiny() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_file(dir.path(), "portrait.png", 60, 90);
    let out = dir.path().join("out.mp4");
    let o = skyreels(
        dir.path(),
        &[
            "generate",
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            "FPS-24, a cat",
            "--seed",
            "-1",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("bundled tiny random weights"), "{err}");
    assert!(err.contains("seed: "), "{err}");
    // a portrait image turns the default size around
    assert!(err.contains("64x96"), "{err}");
    assert!(err.contains("timings: "), "{err}");
    // a default run is quiet: the tiny weights' own negative prompt fits their encoders, and
    // the H.264 encoder's console chatter does not reach the terminal
    assert!(!err.contains("was cut"), "{err}");
    assert!(!err.contains("OpenH264"), "{err}");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[4..8], b"ftyp");
}

#[test]
fn bad_input_gets_a_clear_message_and_a_failing_exit() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_file(dir.path(), "ok.png", 96, 64);
    let img = img.to_str().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not an image").unwrap();
    let one_ratio = dir.path().join("one.json");
    std::fs::write(&one_ratio, b"[1.0]").unwrap();
    let one_ratio = one_ratio.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--image", "/no/such.png"], "does not exist"),
        (
            vec!["--image", broken.to_str().unwrap()],
            "cannot decode image",
        ),
        (
            vec!["--image", img, "--height", "72"],
            "--height must be a multiple of 16, got 72",
        ),
        (
            vec!["--image", img, "--num-frames", "8"],
            "--num-frames must be 4k+1",
        ),
        // the server's limits (skyreels-params), named by the flags
        (
            vec!["--image", img, "--steps", "101"],
            "--steps must be an integer from 1 to 100, got 101",
        ),
        (
            vec!["--image", img, "--num-frames", "261"],
            "--num-frames must be an integer from 1 to 257",
        ),
        (
            vec!["--image", img, "--width", "4112", "--height", "64"],
            "--width must be an integer from 16 to 4096",
        ),
        (
            vec!["--image", img, "--guidance-scale", "31"],
            "--guidance-scale must be a number from 0 to 30, got 31",
        ),
        (
            vec!["--image", img, "--fps", "0"],
            "--fps must be a number from 1 to 120, got 0",
        ),
        (
            vec!["--image", img, "--model", "/no/such/model"],
            "no such file or folder",
        ),
        (
            vec!["--image", img, "--model", dir.path().to_str().unwrap()],
            "model_index.json",
        ),
        (
            vec!["--image", img, "--prompt", "  "],
            "the prompt is empty",
        ),
        (vec!["--prompt", "x"], "an image is required"),
        (vec!["--image", img, "--seed", "-5"], "--seed"),
        (
            vec!["--image", img, "--flow-shift", "0"],
            "--flow-shift must be a number above 0 and at most 20, got 0",
        ),
        (
            vec!["--image", img, "--flow-shift", "25"],
            "--flow-shift must be a number above 0 and at most 20, got 25",
        ),
        (
            vec!["--image", img, "--cfg-gate", "1"],
            "'--cfg-gate <F>': must be a number above 0 and below 1, got \"1\"",
        ),
        (
            vec!["--image", img, "--cache", "magcache:0.1,max_skip=0"],
            "magcache[:THRESHOLD[,max_skip=K][,retention=R]]",
        ),
        (
            vec!["--image", img, "--cache", "magcache"],
            "cache: magcache needs the model's magnitude ratios and none are loaded: pass \
             --cache-ratios FILE.json",
        ),
        (
            vec!["--image", img, "--cache-ratios", "/no/such.json"],
            "--cache-ratios /no/such.json: ",
        ),
        (
            vec!["--image", img, "--cache-ratios", one_ratio],
            "magnitude ratios: must be an array of 2 to 1000 numbers",
        ),
        // the tiny transformer's temporal RoPE axis has 4 dims: 2 frequencies
        (
            vec!["--image", img, "--riflex-freq-index", "3"],
            "riflex_freq_index must be from 0 (off) to 2",
        ),
    ];
    for (extra, want) in cases {
        let out = dir.path().join("o.mp4");
        let mut args = vec!["generate", "-o", out.to_str().unwrap()];
        if !extra.contains(&"--prompt") {
            args.extend(["--prompt", "a cat"]);
        }
        args.extend(extra.iter().copied());
        let o = skyreels(dir.path(), &args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            err.contains(want),
            "{args:?}: {err:?} should mention {want:?}"
        );
    }
}

#[test]
fn help_documents_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let o = skyreels(dir.path(), &["generate", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--model",
        "--transformer",
        "--image",
        "--negative-prompt",
        "--num-frames",
        "--guidance-scale",
        "--embedded-guidance-scale",
        "--noise",
        "--fps",
        "--flow-shift",
        "--cfg-gate",
        "--cache-ratios",
        "--riflex-freq-index",
        "--lora",
        "--output",
        "--device",
        "--dtype",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
    }
    let o = skyreels(dir.path(), &["serve", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--host",
        "--port",
        "--model",
        "--transformer",
        "--api-key",
        "--output-dir",
        "--max-queue",
        "--public-url",
        "--allow-private-image-urls",
        "--device",
        "--dtype",
        "SKYREELS_API_KEYS",
        "--allowed-host",
        "--protect-ops",
        "--max-work",
        "--max-task-seconds",
        "--header-timeout",
        "--body-timeout",
        "--idle-timeout",
        "--cfg-gate",
        "SKYREELS_CFG_GATE",
        "--cache-ratios",
        "SKYREELS_CACHE_RATIOS",
        "--max-connections",
        "--redis",
        "SKYREELS_REDIS_URL",
        "--workers",
        "--output-store",
        "--claim-timeout",
        "--max-upload-mb",
        "--upload-quota-mb",
        "--upload-total-mb",
        "--queue-ttl-hours",
        "--forget-models-after-minutes",
        "--redis-ca",
        "--allow-redis-without-password",
        "--warmup",
        "--max-event-streams",
        "--safety-checker",
        "--safety-frames",
        "--nsfw-action",
    ] {
        assert!(out.contains(flag), "{flag} missing from serve --help");
    }
    let o = skyreels(dir.path(), &["worker", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--redis",
        "--model",
        "--transformer",
        "--device",
        "--metrics-port",
        "--claim-timeout",
        "--output-store",
        "--max-task-seconds",
        "--max-work",
        "--queue-ttl-hours",
        "--redis-ca",
        "--allow-redis-without-password",
        "--warmup",
        "--safety-checker",
        "--safety-frames",
        "--nsfw-action",
    ] {
        assert!(out.contains(flag), "{flag} missing from worker --help");
    }
}

#[test]
fn serve_refuses_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let empty = dir.path().join("no-checker");
    std::fs::create_dir(&empty).unwrap();
    let empty_dir = empty.to_str().unwrap();
    for (args, want) in [
        (
            &["serve", "--max-queue", "0"][..],
            "--max-queue must be at least 1",
        ),
        (
            &["serve", "--retention-hours", "-1"][..],
            "--retention-hours must be >= 0",
        ),
        (&["serve", "--port", "70000"][..], "70000"),
        (
            &["serve", "--max-work", "0"][..],
            "--max-work must be a positive number",
        ),
        (
            &["serve", "--cfg-gate", "0"][..],
            "must be a number above 0 and below 1",
        ),
        (
            &["serve", "--header-timeout", "0"][..],
            "--header-timeout must be at least 1",
        ),
        (
            &["serve", "--workers", "0"][..],
            "--workers 0 (an API-only node) needs --redis",
        ),
        (
            &["serve", "--workers", "3", "--device", "cpu:0,cpu:1"][..],
            "--workers 3: this node has 2 device entries",
        ),
        (
            &["serve", "--claim-timeout", "0"][..],
            "--claim-timeout must be a positive number",
        ),
        (
            &["worker"][..],
            "skyreels worker takes its tasks from Redis",
        ),
        (
            &["serve", "--max-upload-mb", "0"][..],
            "--max-upload-mb must be at least 1",
        ),
        (
            &["worker", "--queue-ttl-hours", "0"][..],
            "--queue-ttl-hours must be a positive number",
        ),
        (
            // refused before any connection is made
            &[
                "worker",
                "--redis",
                "redis://redis.internal:6379/0",
                "--output-dir",
                out,
            ][..],
            "has no password and is not on this machine",
        ),
        (
            &[
                "worker",
                "--redis",
                "http://:secret@host/0",
                "--output-dir",
                out,
            ][..],
            "--redis \"http://:***@host/0\"",
        ),
        (
            &[
                "serve",
                "--model",
                "/no/such/folder",
                "--port",
                "0",
                "--output-dir",
                out,
            ][..],
            "/no/such/folder",
        ),
        (
            &["serve", "--safety-frames", "0", "--output-dir", out][..],
            "--safety-frames must be at least 1",
        ),
        (
            // the worker's load fails, naming the checker and the file it lacks
            &[
                "serve",
                "--safety-checker",
                empty_dir,
                "--port",
                "0",
                "--output-dir",
                out,
            ][..],
            "config.json",
        ),
    ] {
        let o = skyreels(dir.path(), args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// A Hugging Face cache (hub layout: models--owner--name/{refs/main, snapshots/<sha>/...}) holding
/// the tiny pipeline as `acme/tiny-pipeline` and the T2V test transformer as `acme/t2v` (files at
/// the repo root, as Skywork's repos have them).
fn fake_hub_cache(root: &Path) -> PathBuf {
    let cache = root.join("hub");
    for (repo, src) in [
        ("models--acme--tiny-pipeline", tiny_weights()),
        ("models--acme--t2v", fixture("pipeline/t2v_transformer")),
    ] {
        let dir = cache.join(repo);
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs/main"), "0123abcd").unwrap();
        copy_tree(&src, &dir.join("snapshots/0123abcd"));
    }
    cache
}

#[test]
fn hub_repos_resolve_from_the_cache_offline_or_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let cache = fake_hub_cache(dir.path());
    let cache = cache.to_str().unwrap();
    let img = image_file(dir.path(), "in.png", 96, 64);
    let out = dir.path().join("o.safetensors");
    let run = |extra: &[&str], endpoint: &str| {
        let mut args = vec![
            "generate",
            "--prompt",
            "a cat",
            "--cache-dir",
            cache,
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_skyreels"))
            .args(&args)
            .env("XDG_CACHE_HOME", dir.path())
            .env("HF_ENDPOINT", endpoint)
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        (o.status.success(), stderr(&o))
    };
    // nothing listens on port 9: the hub is unreachable either way
    let hub = "http://127.0.0.1:9";
    let i2v = [
        "--model",
        "acme/tiny-pipeline",
        "--image",
        img.to_str().unwrap(),
    ];
    let (ok, err) = run(&[&i2v[..], &["--offline"]].concat(), hub);
    assert!(ok, "{err}");
    let (ok, err) = run(&i2v, hub);
    assert!(ok, "{err}");
    assert!(err.contains("using the cached copy"), "{err}");
    // a transformer repo with its weights at the root, text-to-video (no image)
    let (ok, err) = run(
        &[
            "--model",
            "acme/tiny-pipeline",
            "--transformer",
            "acme/t2v",
            "--offline",
        ],
        hub,
    );
    assert!(ok, "{err}");
    // not cached: the error names the repo and the cache
    let (ok, err) = run(
        &["--model", "acme/missing", "--offline", "--image", "x.png"],
        hub,
    );
    assert!(!ok);
    assert!(
        err.contains("acme/missing is not in the Hugging Face cache") && err.contains(cache),
        "{err}"
    );
    let (ok, err) = run(&["--model", "acme/missing"], hub);
    assert!(!ok);
    assert!(err.contains("the hub cannot be reached"), "{err}");
}

/// Serves `body` with `status` to every connection on a local port; returns the base URL.
fn http_server(status: &'static str, body: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

#[test]
fn image_urls_are_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let png = std::fs::read(image_file(dir.path(), "in.png", 96, 64)).unwrap();
    let out = dir.path().join("o.safetensors");
    let out = out.to_str().unwrap();
    let url = format!("{}/in.png", http_server("200 OK", png));
    let o = skyreels(
        dir.path(),
        &["generate", "--prompt", "a cat", "--image", &url, "-o", out],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let url = format!(
        "{}/missing.png",
        http_server("404 Not Found", b"no".to_vec())
    );
    let o = skyreels(
        dir.path(),
        &["generate", "--prompt", "a cat", "--image", &url, "-o", out],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot fetch image"), "{}", stderr(&o));
}

#[test]
fn bench_runs_every_stage_on_tiny_random_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = skyreels(
        dir.path(),
        &["bench", "--size", "tiny", "--device", "cpu", "--runs", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    // 64x64, 5 frames: 2 x 4 x 4 video tokens after the (1, 2, 2) patch, + 16 text tokens
    assert!(text.contains("48 tokens (32 video + 16 text)"), "{text}");
    for stage in [
        "forward",
        "attention",
        "linear 32->96",
        "linear 160->32",
        "cfg step",
        "vae decode",
        "text encode",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(stage) && l.contains(" s ")),
            "no timing for {stage}: {text}"
        );
    }
    // the breakdown: one attention call per block (1 dual + 1 single), the linears, the rest
    for line in [
        "per forward: attention 2 x ",
        "per forward: linear layers ",
        "per forward: the rest (norms, modulation, RoPE, elementwise) ",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(line) && l.ends_with("% of the forward)")),
            "no '{line}' line: {text}"
        );
    }
    let out = skyreels(
        dir.path(),
        &[
            "bench",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--num-frames",
            "6",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("4k+1"), "{}", stderr(&out));
    // a CPU-only build says how to get CUDA (a CUDA build on a machine without a GPU fails too)
    let out = skyreels(dir.path(), &["bench", "--size", "tiny", "--device", "cuda"]);
    if !cfg!(feature = "cuda") {
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--features cuda"), "{}", stderr(&out));
    }
}

#[test]
fn devices_quantize_and_single_files_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // one device for generate; a bad list is refused by the parser with the rule
    let out = skyreels(
        dir.path(),
        &["generate", "--prompt", "p", "--device", "cpu:0,cpu:1"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("lists 2 devices"), "{}", stderr(&out));
    let out = skyreels(dir.path(), &["serve", "--device", "cpu,cuda:0"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("all cpu or all cuda"),
        "{}",
        stderr(&out)
    );
    // quantize writes a GGUF the loader keeps quantized, and says what it wrote
    let gguf = dir.path().join("q8.gguf");
    let input = fixture("single_file/orig_bf16.safetensors");
    let out = skyreels(
        dir.path(),
        &[
            "quantize",
            input.to_str().unwrap(),
            gguf.to_str().unwrap(),
            "--type",
            "q8_0",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    // 31 stored 2-D weights (the fused qkv and linear1 ones are single tensors in this layout)
    assert!(said.contains("43 F32, 31 Q8_0 tensors"), "{said}");
    let out = skyreels(
        dir.path(),
        &[
            "bench",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--runs",
            "1",
            "--parts",
            "transformer",
            "--transformer",
            gguf.to_str().unwrap(),
            "--offload",
            "blocks",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("40 matmul weights in their stored form"),
        "{said}"
    );
    // --config belongs to a single-file transformer; an unknown ggml type is a parser error
    let out = skyreels(
        dir.path(),
        &["generate", "--prompt", "p", "--config", "config.json"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("single-file --transformer"),
        "{}",
        stderr(&out)
    );
    let out = skyreels(
        dir.path(),
        &["quantize", "a.safetensors", "b.gguf", "--type", "iq4_nl"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Q4_K"), "{}", stderr(&out));
}

/// A copy of the tiny test safety checker (tests/fixtures/safety/checker) whose concept
/// thresholds are -1: every frame it looks at is flagged.
fn flag_everything_checker(dir: &Path) -> PathBuf {
    let to = dir.join("checker");
    copy_tree(&fixture("safety/checker"), &to);
    let path = to.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header["concept_embeds_weights"];
    assert_eq!(t["dtype"], "F32");
    let (a, b) = (
        t["data_offsets"][0].as_u64().unwrap() as usize,
        t["data_offsets"][1].as_u64().unwrap() as usize,
    );
    for v in bytes[8 + n + a..8 + n + b].chunks_exact_mut(4) {
        v.copy_from_slice(&(-1.0f32).to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    to
}

/// One HTTP/1.1 exchange with a server on loopback (`Connection: close`): the status and the
/// JSON body.
fn http_json(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    let status = text[9..12].parse().unwrap();
    let json = text.split_once("\r\n\r\n").map_or("null", |(_, b)| b);
    (
        status,
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

/// `skyreels serve` on the tiny weights with a safety checker that flags everything: under
/// `--nsfw-action flag` a task completes with `has_nsfw_contents: [true]` (and `[false]` with
/// `enable_safety_checker: false`); under `block` it fails with 1451 and leaves no video.
#[test]
fn a_live_server_flags_or_blocks_what_its_safety_checker_flags() {
    let dir = tempfile::tempdir().unwrap();
    let checker = flag_everything_checker(dir.path());
    let png = std::fs::read(image_file(dir.path(), "in.png", 96, 64)).unwrap();
    let image = format!("{}/in.png", http_server("200 OK", png));
    for action in ["flag", "block"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = dir.path().join(action);
        let mut child = Command::new(env!("CARGO_BIN_EXE_skyreels"))
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--allow-private-image-urls",
            ])
            .args([
                "--safety-checker",
                checker.to_str().unwrap(),
                "--safety-frames",
                "3",
            ])
            .args([
                "--nsfw-action",
                action,
                "--output-dir",
                out.to_str().unwrap(),
            ])
            .env("XDG_CACHE_HOME", dir.path())
            .env_remove("SKYREELS_MODEL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let ready = loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up && http_json(port, "GET", "/ready", None).0 == 200 {
                break true;
            }
            if start.elapsed() > std::time::Duration::from_secs(120) {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let run = |safety: bool| {
            let body = serde_json::json!({"prompt": "a cat", "image": image, "num_inference_steps": 2,
                "num_frames": 5, "seed": 3, "enable_safety_checker": safety});
            let (s, v) = http_json(
                port,
                "POST",
                "/api/v3/wavespeed-ai/SkyReels-V1",
                Some(&body),
            );
            assert_eq!(s, 200, "{v}");
            let id = v["data"]["id"].as_str().unwrap().to_string();
            for _ in 0..600 {
                let (_, v) = http_json(
                    port,
                    "GET",
                    &format!("/api/v3/predictions/{id}/result"),
                    None,
                );
                if ["completed", "failed"]
                    .contains(&v["data"]["status"].as_str().unwrap_or_default())
                {
                    return v["data"].clone();
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            panic!("task {id} did not finish");
        };
        let outcome = ready.then(|| {
            let (_, models) = http_json(port, "GET", "/api/v3/models", None);
            (models, run(true), run(false))
        });
        let _ = child.kill();
        let _ = child.wait();
        let (models, checked, unchecked) = outcome.expect("the server became ready");
        // a local folder is named by its last component only
        assert_eq!(models["data"][0]["safety_checker"], "checker");
        let videos = std::fs::read_dir(out.join("videos")).unwrap().count();
        if action == "flag" {
            assert_eq!(checked["status"], "completed", "{checked}");
            assert_eq!(checked["has_nsfw_contents"], serde_json::json!([true]));
            assert!(checked["timings"]["safety_check"].is_u64(), "{checked}");
            assert_eq!(unchecked["has_nsfw_contents"], serde_json::json!([false]));
            assert!(unchecked["timings"].get("safety_check").is_none());
            assert_eq!(videos, 2);
        } else {
            // block checks every video, whatever the request asks
            assert_eq!(unchecked["code"], 1451, "{unchecked}");
            assert_eq!(
                (checked["status"].as_str(), checked["code"].as_u64()),
                (Some("failed"), Some(1451)),
                "{checked}"
            );
            assert_eq!(checked["outputs"], serde_json::json!([]));
            assert_eq!(videos, 0, "a blocked video is not kept");
        }
    }
}
