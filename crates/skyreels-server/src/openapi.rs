//! The OpenAPI document (`/openapi.json`), derived from the handlers' `#[utoipa::path]` and the
//! contract types; the Swagger UI (`/docs`, assets vendored in the binary); the model entries
//! of `/api/v3/models`.

use crate::api::{ops, playground, predictions, submit, uploads};
use crate::contract::{ModelEntry, SubmitRequest};
use crate::generator::ModelInfo;
use serde_json::{json, Value};
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "skyreels-server",
        description = "WaveSpeed /api/v3 compatible SkyReels V1 server. Every JSON answer is the envelope {code, message, data} with the HTTP status equal to code."
    ),
    paths(
        submit::submit,
        predictions::result,
        predictions::result_alias,
        predictions::cancel,
        ops::models,
        ops::webhook_secret,
        uploads::upload_binary,
        uploads::upload_ticket,
        uploads::upload_put,
        uploads::upload_file,
        ops::health,
        ops::ready,
        ops::metrics,
        playground::page,
    ),
    modifiers(&Extras)
)]
struct ApiDoc;

/// The bearer scheme, and the routes served by file services rather than handlers.
struct Extras;

impl Modify for Extras {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let outputs = OperationBuilder::new()
            .summary(Some("A finished video (MP4, Range requests supported)"))
            .tag("tasks")
            .parameter(
                ParameterBuilder::new()
                    .name("file")
                    .parameter_in(ParameterIn::Path)
                    .required(utoipa::openapi::Required::True),
            )
            .response(
                "200",
                ResponseBuilder::new()
                    .description("The video")
                    .content("video/mp4", ContentBuilder::new().build()),
            )
            .build();
        doc.paths.paths.insert(
            "/outputs/{file}".into(),
            PathItem::new(HttpMethod::Get, outputs),
        );
    }
}

/// The OpenAPI 3.1 document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// JSON schema of a submit body for this model: the contract's schema with the model's
/// defaults and required fields.
pub fn input_schema(m: &ModelInfo) -> Value {
    let mut s = serde_json::to_value(SubmitRequest::schema()).unwrap_or_default();
    let mut required = vec!["prompt"];
    if m.image_to_video {
        required.push("image");
    }
    s["required"] = json!(required);
    for (field, default) in [
        ("num_inference_steps", json!(m.defaults.num_inference_steps)),
        ("num_frames", json!(m.defaults.num_frames)),
        ("width", json!(m.defaults.width)),
        ("height", json!(m.defaults.height)),
        ("guidance_scale", json!(skyreels_params::GUIDANCE_SCALE)),
        (
            "embedded_guidance_scale",
            json!(skyreels_params::EMBEDDED_GUIDANCE_SCALE),
        ),
        ("fps", json!(skyreels_params::FPS)),
        ("seed", json!(-1)),
    ] {
        if let Some(p) = s["properties"].get_mut(field) {
            p["default"] = default;
        }
    }
    if let Some(p) = s["properties"].get_mut("width") {
        p["multipleOf"] = json!(m.size_multiple);
    }
    if let Some(p) = s["properties"].get_mut("height") {
        p["multipleOf"] = json!(m.size_multiple);
    }
    s
}

/// One entry of `GET /api/v3/models`.
pub fn model_entry(m: &ModelInfo) -> ModelEntry {
    ModelEntry {
        model_id: m.id.clone(),
        name: m.id.clone(),
        kind: if m.image_to_video {
            "image-to-video"
        } else {
            "text-to-video"
        }
        .into(),
        description: "SkyReels V1 (HunyuanVideo) served by skyreels-server. No NSFW classifier runs: has_nsfw_contents is always false.".into(),
        api_schema: crate::contract::ApiSchema {
            input: input_schema(m),
        },
    }
}

/// Swagger UI at `/docs`, the document at `/openapi.json`.
pub fn swagger<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    SwaggerUi::new("/docs")
        .url("/openapi.json", document())
        .into()
}
