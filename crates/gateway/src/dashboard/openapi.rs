//! `GET /admin/openapi.json`: the admin API as an OpenAPI 3.1 document, built with
//! utoipa's typed model from [`ROUTES`], the one list of `/admin` routes. The routes
//! answer `serde_json` values rather than typed structs, so the document names each
//! operation, its parameters and its statuses, not body schemas.

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathItem, PathsBuilder, Required,
    ResponseBuilder, ResponsesBuilder,
};

/// One `/admin` route.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    /// `(name, "path" | "query", description)`.
    pub params: &'static [(&'static str, &'static str, &'static str)],
}

const SINCE: (&str, &str, &str) = ("since", "query", "window, e.g. 30m, 24h (default), 7d");

/// Every `/admin` route (the dashboard's own pages are not an API).
pub const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/admin/keys",
        tag: "keys",
        summary: "Every virtual key, revoked ones included; never a key or its hash",
        params: &[],
    },
    Route {
        method: "post",
        path: "/admin/keys",
        tag: "keys",
        summary: "Create a key from {owner, tier?, models?, can_assert_tier?}; 201 with the key, shown once",
        params: &[],
    },
    Route {
        method: "delete",
        path: "/admin/keys/{id}",
        tag: "keys",
        summary: "Revoke a key (repeating is harmless)",
        params: &[("id", "path", "the key's id, key_...")],
    },
    Route {
        method: "post",
        path: "/admin/keys/{id}/revoke",
        tag: "keys",
        summary: "Revoke a key (repeating is harmless)",
        params: &[("id", "path", "the key's id, key_...")],
    },
    Route {
        method: "get",
        path: "/admin/tiers",
        tag: "tiers",
        summary: "The configured tiers and the default tier",
        params: &[],
    },
    Route {
        method: "get",
        path: "/admin/budgets",
        tag: "budgets",
        summary: "Each budget rule's counters this period: spend, limit, percent, forecast",
        params: &[(
            "limit",
            "query",
            "counters per rule, 1 to 1000 (default 100)",
        )],
    },
    Route {
        method: "get",
        path: "/admin/penalties",
        tag: "limits",
        summary: "End users under an abuse penalty",
        params: &[],
    },
    Route {
        method: "delete",
        path: "/admin/penalties/{key}",
        tag: "limits",
        summary: "Lift a penalty early",
        params: &[("key", "path", "the penalty's key, as listed")],
    },
    Route {
        method: "get",
        path: "/admin/experiments",
        tag: "experiments",
        summary: "A report per configured experiment: per-variant figures, differences against control with 95% intervals and p-values, the sample-ratio check, a verdict",
        params: &[SINCE],
    },
    Route {
        method: "get",
        path: "/admin/experiments/{name}",
        tag: "experiments",
        summary: "One experiment's report; 404 for an unknown name",
        params: &[("name", "path", "the experiment's name"), SINCE],
    },
    Route {
        method: "get",
        path: "/admin/stats",
        tag: "stats",
        summary: "What `sluice stats --json` prints: latency, tokens, cost, errors, cache, feedback",
        params: &[
            SINCE,
            (
                "by",
                "query",
                "none (default), model, feature, user or hour",
            ),
        ],
    },
    Route {
        method: "get",
        path: "/admin/overview",
        tag: "stats",
        summary: "The dashboard's figures: totals, time series, by model, feature and hour, top users",
        params: &[SINCE],
    },
    Route {
        method: "get",
        path: "/admin/records",
        tag: "records",
        summary: "The request log, newest first; `next_before` pages on",
        params: &[
            ("model", "query", "the model that answered"),
            ("feature", "query", "the feature tag"),
            ("user", "query", "the end user"),
            (
                "outcome",
                "query",
                "ok, api_error, bad_output, rejected_input, rate_limited, budget_exceeded or client_cancelled",
            ),
            SINCE,
            ("limit", "query", "1 to 500 (default 50)"),
            ("before", "query", "`next_before` of the previous page"),
        ],
    },
    Route {
        method: "get",
        path: "/admin/records/{request_id}",
        tag: "records",
        summary: "One record, every column, with its feedback",
        params: &[(
            "request_id",
            "path",
            "the x-sluice-request-id of the request",
        )],
    },
    Route {
        method: "get",
        path: "/admin/openapi.json",
        tag: "meta",
        summary: "This document",
        params: &[],
    },
];

fn method(m: &str) -> HttpMethod {
    match m {
        "post" => HttpMethod::Post,
        "delete" => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

/// The document, built once.
pub fn document() -> &'static OpenApi {
    static DOC: LazyLock<OpenApi> = LazyLock::new(build);
    &DOC
}

fn build() -> OpenApi {
    let mut paths = PathsBuilder::new();
    let mut grouped: Vec<(&str, Vec<&Route>)> = Vec::new();
    for r in ROUTES {
        match grouped.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, routes)) => routes.push(r),
            None => grouped.push((r.path, vec![r])),
        }
    }
    for (path, routes) in grouped {
        let mut item: Option<PathItem> = None;
        for r in routes {
            let mut op = OperationBuilder::new()
                .tag(r.tag)
                .summary(Some(r.summary))
                .operation_id(Some(format!(
                    "{}_{}",
                    r.method,
                    r.path
                        .trim_start_matches("/admin/")
                        .replace(['/', '.', '{', '}'], "_")
                        .trim_matches('_')
                )));
            for (name, at, description) in r.params {
                let at_path = *at == "path";
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(*name)
                        .parameter_in(if at_path {
                            ParameterIn::Path
                        } else {
                            ParameterIn::Query
                        })
                        .required(if at_path {
                            Required::True
                        } else {
                            Required::False
                        })
                        .description(Some(*description)),
                );
            }
            let ok = if r.method == "post" && r.path == "/admin/keys" {
                "201"
            } else {
                "200"
            };
            op = op.responses(
                ResponsesBuilder::new()
                    .response(ok, ResponseBuilder::new().description("JSON").build())
                    .response(
                        "400",
                        ResponseBuilder::new()
                            .description("bad input, as an OpenAI error body")
                            .build(),
                    )
                    .response(
                        "401",
                        ResponseBuilder::new()
                            .description("missing or wrong admin key")
                            .build(),
                    )
                    .build(),
            );
            item = Some(match item {
                None => PathItem::new(method(r.method), op.build()),
                Some(existing) => {
                    let mut merged = existing;
                    merged.merge_operations(PathItem::new(method(r.method), op.build()));
                    merged
                }
            });
        }
        if let Some(item) = item {
            paths = paths.path(path, item);
        }
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Sluice admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Keys, tiers, budgets, penalties, stats and the request log. Every route needs the admin (master) key as `Authorization: Bearer <key>`.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme(
                    "admin_key",
                    SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
                )
                .build(),
        ))
        .security(Some([SecurityRequirement::new("admin_key", Vec::<String>::new())]))
        .build()
}

/// `GET /admin/openapi.json`.
pub async fn openapi_json() -> Response {
    axum::Json(document()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_document_once() {
        let doc = serde_json::to_value(document()).unwrap();
        let mut n = 0;
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.method];
            assert!(op.is_object(), "{} {} missing", r.method, r.path);
            assert_eq!(op["summary"], r.summary);
            n += 1;
        }
        let counted: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(counted, n);
        assert_eq!(
            doc["components"]["securitySchemes"]["admin_key"]["scheme"],
            "bearer"
        );
    }
}
