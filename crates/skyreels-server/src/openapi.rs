//! The OpenAPI description (`/openapi.json`), the Swagger UI (`/docs`, assets vendored in the
//! binary) and the model entries of `/api/v3/models`.

use crate::generator::ModelInfo;
use serde_json::{json, Value};
use utoipa_swagger_ui::SwaggerUi;

/// JSON schema of a submit body for this model.
pub fn input_schema(m: &ModelInfo) -> Value {
    let mut required = vec!["prompt"];
    if m.image_to_video {
        required.push("image");
    }
    json!({
        "type": "object",
        "required": required,
        "properties": {
            "prompt": {"type": "string", "description": "What the video shows; SkyReels prompts start with \"FPS-24, \"."},
            "image": {"type": "string", "description": "First frame: http(s) URL, data:image/...;base64 URI, or an upload's download_url."},
            "negative_prompt": {"type": "string", "description": "What to avoid (true CFG). Default: SkyReels' negative prompt."},
            "seed": {"type": "integer", "minimum": -1, "maximum": 2147483647, "default": -1, "description": "-1: random; the seed used is reported."},
            "guidance_scale": {"type": "number", "minimum": 0, "maximum": 30, "default": 6.0},
            "embedded_guidance_scale": {"type": "number", "minimum": 0, "maximum": 30, "default": 1.0},
            "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 100, "default": m.num_inference_steps},
            "num_frames": {"type": "integer", "minimum": 1, "maximum": 257, "default": m.num_frames, "description": "4k+1"},
            "aspect_ratio": {"type": "string", "enum": ["16:9", "9:16"], "description": "Default: the image's orientation."},
            "width": {"type": "integer", "multipleOf": m.size_multiple, "default": m.width},
            "height": {"type": "integer", "multipleOf": m.size_multiple, "default": m.height},
            "fps": {"type": "number", "minimum": 1, "maximum": 120, "default": 24},
            "enable_sync_mode": {"type": "boolean", "default": false},
            "enable_base64_output": {"type": "boolean", "default": false}
        }
    })
}

/// One entry of `GET /api/v3/models`.
pub fn model_entry(m: &ModelInfo) -> Value {
    json!({
        "model_id": m.id,
        "name": m.id,
        "type": if m.image_to_video { "image-to-video" } else { "text-to-video" },
        "description": "SkyReels V1 (HunyuanVideo) served by skyreels-server. No NSFW classifier runs: has_nsfw_contents is always false.",
        "api_schema": {"input": input_schema(m)},
    })
}

fn op(summary: &str, auth: bool) -> Value {
    let mut o = json!({"summary": summary, "responses": {"200": {"description": "envelope {code, message, data}"}}});
    if auth {
        o["security"] = json!([{"bearer": []}]);
    }
    o
}

/// The OpenAPI 3.1 document.
pub fn document() -> Value {
    let id = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut submit = op(
        "Submit a task (WaveSpeed model id, e.g. wavespeed-ai/SkyReels-V1)",
        true,
    );
    submit["parameters"] = json!([
        {"name": "owner", "in": "path", "required": true, "schema": {"type": "string"}},
        {"name": "model", "in": "path", "required": true, "schema": {"type": "string"}},
        {"name": "webhook", "in": "query", "required": false, "schema": {"type": "string"}}
    ]);
    submit["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": input_schema(&ModelInfo {
        id: String::new(), image_to_video: true, height: 544, width: 960, num_frames: 97, num_inference_steps: 30, size_multiple: 16,
    })}}});
    let with_id = |mut o: Value| {
        o["parameters"] = id.clone();
        o
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "skyreels-server", "version": env!("CARGO_PKG_VERSION"),
                 "description": "WaveSpeed /api/v3 compatible SkyReels V1 server"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/api/v3/{owner}/{model}": {"post": submit},
            "/api/v3/predictions/{id}/result": {"get": with_id(op("A task's state and outputs", true))},
            "/api/v3/predictions/{id}": {
                "get": with_id(op("Alias of /result", true)),
                "delete": with_id(op("Cancel a queued or running task; delete a finished one", true))
            },
            "/api/v3/models": {"get": op("Served models and their input schema", true)},
            "/api/v3/webhook/secret": {"get": op("The webhook signing secret", true)},
            "/api/v3/media/upload/binary": {"post": op("Upload a file (multipart field `file`)", true)},
            "/api/v3/media/uploads": {"post": op("Open an upload ticket: {filename, size, content_type?}", true)},
            "/api/v3/media/uploads/{token}": {"put": op("Send an upload's bytes (no Authorization: the URL is the secret)", false)},
            "/api/v3/media/files/{id}/{name}": {"get": op("An uploaded file", false)},
            "/outputs/{file}": {"get": op("A finished video (MP4, Range requests supported)", false)},
            "/health": {"get": op("Liveness", false)},
            "/ready": {"get": op("200 once the model is loaded, 503 while loading or shutting down", false)},
            "/metrics": {"get": op("Prometheus metrics", false)}
        }
    })
}

/// Swagger UI at `/docs`, the document at `/openapi.json`.
pub fn swagger<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    SwaggerUi::new("/docs")
        .external_url_unchecked("/openapi.json", document())
        .into()
}
