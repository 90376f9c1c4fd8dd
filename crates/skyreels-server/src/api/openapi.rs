//! The OpenAPI document (`/openapi.json`), derived from the handlers' `#[utoipa::path]` and the
//! contract types; the Swagger UI (`/docs`, assets vendored in the binary).

use super::{events, ops, playground, predictions, submit, uploads};
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ResponseBuilder};
use utoipa::{Modify, OpenApi};
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
        events::events,
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
/// Swagger UI at `/docs`, the document at `/openapi.json`.
pub fn swagger<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    SwaggerUi::new("/docs")
        .url("/openapi.json", document())
        .into()
}
