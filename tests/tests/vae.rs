//! HunyuanVideo VAE: parity with diffusers 0.42.1 for encode, decode and every tiling path.
//!
//! Fixtures come from `scripts/fixtures/vae.py` (two tiny random VAEs, f32 CPU references).

use candle_core::{DType, Device, Tensor};
use skyreels_models::{AutoencoderKLHunyuanVideo, Tiling};
use skyreels_pipeline::load_vae;
use skyreels_tests::{fixture, fixture_tiling, load_tensors, max_abs, rel_l2};
use std::collections::HashMap;

/// Relative L2 bound for f32 parity. Same math as the reference; only the rounding differs
/// (convolutions by Winograd F(2x2, 3x3) or direct sums with merged taps, GroupNorm reductions),
/// a few f32 ulps per op through ~30 layers (measured: <= 1.8e-6). A wrong padding side, blend
/// weight or tile order moves the output by >= 1e-2.
const F32_TOL: f64 = 1e-5;

struct Case {
    vae: AutoencoderKLHunyuanVideo,
    data: HashMap<String, Tensor>,
}

fn case(name: &str) -> Case {
    Case {
        vae: load_vae(&fixture(&format!("vae/{name}")), DType::F32, &Device::Cpu).unwrap(),
        data: load_tensors(&fixture(&format!("vae/{name}/cases.safetensors"))),
    }
}

impl Case {
    fn tiling(&mut self, id: &str) {
        self.vae
            .set_tiling(fixture_tiling(&self.data[&format!("{id}.tiling")]))
            .unwrap();
    }

    fn check_encode(&mut self, id: &str) {
        self.tiling(id);
        let post = self.vae.encode(&self.data[&format!("{id}.input")]).unwrap();
        for (got, key) in [(&post.mean, "mean"), (&post.logvar, "logvar")] {
            let err = rel_l2(got, &self.data[&format!("{id}.{key}")]);
            assert!(err <= F32_TOL, "{id} {key}: relative L2 error {err:e}");
        }
    }

    fn check_decode(&mut self, id: &str) {
        self.tiling(id);
        let got = self.vae.decode(&self.data[&format!("{id}.input")]).unwrap();
        let err = rel_l2(&got, &self.data[&format!("{id}.output")]);
        assert!(err <= F32_TOL, "{id}: relative L2 error {err:e}");
    }
}

macro_rules! parity {
    ($($test:ident: $kind:ident $id:literal;)*) => {$(
        #[test]
        fn $test() {
            for name in ["tiny_a", "tiny_b"] {
                let mut c = case(name);
                c.$kind($id);
            }
        }
    )*};
}

parity! {
    encode_one_image: check_encode "enc_image";
    encode_video: check_encode "enc_video";
    encode_spatially_tiled: check_encode "enc_s";
    encode_temporally_tiled: check_encode "enc_t";
    decode_video: check_decode "dec_video";
    decode_temporally_tiled: check_decode "dec_t";
    decode_spatially_tiled: check_decode "dec_s";
    decode_tiled_both_ways: check_decode "dec_ts";
    decode_with_default_tiles: check_decode "dec_default";
}

#[test]
fn bad_sizes_are_clear_errors() {
    let c = case("tiny_a");
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 3, 4, 16, 24), DType::F32, &dev).unwrap();
    let e = c.vae.encode(&x).unwrap_err().to_string();
    assert!(e.contains("4k+1"), "{e}");
    let x = Tensor::zeros((1, 3, 5, 16, 20), DType::F32, &dev).unwrap();
    let e = c.vae.encode(&x).unwrap_err().to_string();
    assert!(e.contains("multiple of 8"), "{e}");
    let z = Tensor::zeros((1, 3, 2, 2, 2), DType::F32, &dev).unwrap();
    let e = c.vae.decode(&z).unwrap_err().to_string();
    assert!(e.contains("channels"), "{e}");
    let mut vae = c.vae.clone();
    let bad = Tiling {
        tile_sample_stride_height: 300,
        ..Tiling::default()
    };
    assert!(vae.set_tiling(bad).is_err());
}

/// A cancel lands within a tile: `decode_until` asks before every tile (temporal windows of
/// spatial tiles here), decodes what `decode` does while the answer is yes, and stops at the
/// first no without decoding another tile.
#[test]
fn decode_asks_before_every_tile_and_stops_at_a_no() {
    let mut c = case("tiny_a");
    c.tiling("dec_ts");
    let z = c.data["dec_ts.input"].clone();
    let want = c.vae.decode(&z).unwrap();
    let mut asked = 0;
    let got = c
        .vae
        .decode_until(&z, &mut || {
            asked += 1;
            true
        })
        .unwrap()
        .unwrap();
    assert_eq!(max_abs(&got, &want), 0.0);
    assert!(asked > 2, "asked {asked} times");
    for stop_at in [1, 2, asked] {
        let mut n = 0;
        let stopped = c
            .vae
            .decode_until(&z, &mut || {
                n += 1;
                n < stop_at
            })
            .unwrap();
        assert!(stopped.is_none(), "stop at {stop_at}");
        assert_eq!(n, stop_at);
    }
}
