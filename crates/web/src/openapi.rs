//! The conventions of every route, written into the OpenAPI document once.
//!
//! Each route documents its own answers; what every route shares (problem
//! documents as `application/problem+json`, 401 with `WWW-Authenticate` on a
//! protected route, 400/413/415/422 on a JSON body, 422 on a query parameter,
//! 400 on a cursor, 404 on a path id, 503 with `Retry-After` when storage is
//! unavailable or the request times out) is added here to every API operation
//! that lacks it, so the document lists every answer the server can give.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, ResponseBuilder, Type,
    schema::ObjectBuilder,
};

use crate::error::PROBLEM_JSON;

/// Rewrites `doc` in place (see the module's documentation).
pub fn apply_conventions(doc: &mut OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        // The public API and the routes services call each other on.
        let api = path.starts_with("/v1/") || path.starts_with("/internal/");
        let path_level_params = item.parameters.clone().unwrap_or_default();
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
            &mut item.query,
        ];
        for operation in operations.into_iter().flatten() {
            if api {
                add_shared_answers(operation, &path_level_params);
            }
            problems_as_problem_json(operation);
        }
    }
}

fn add_shared_answers(
    operation: &mut Operation,
    path_level: &[RefOr<utoipa::openapi::path::Parameter>],
) {
    let params: Vec<(ParameterIn, String)> = operation
        .parameters
        .iter()
        .flatten()
        .chain(path_level)
        .filter_map(|p| match p {
            RefOr::T(p) => Some((p.parameter_in.clone(), p.name.clone())),
            RefOr::Ref(_) => None,
        })
        .collect();
    let has = |place: ParameterIn| params.iter().any(|(p, _)| *p == place);
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let json_body = operation.request_body.as_ref().is_some_and(|b| match b {
        RefOr::T(b) => b.content.contains_key("application/json"),
        RefOr::Ref(_) => true,
    });

    let mut wanted: Vec<(&str, &str)> = Vec::new();
    if json_body {
        wanted.push(("400", "Malformed JSON body"));
        wanted.push(("413", "Body too large"));
        wanted.push(("415", "Unsupported content type"));
        wanted.push(("422", "A field breaks a rule"));
    }
    if params
        .iter()
        .any(|(p, n)| *p == ParameterIn::Query && n == "cursor")
    {
        wanted.push(("400", "Forged or corrupted cursor"));
    }
    if has(ParameterIn::Query) {
        wanted.push(("422", "A query parameter breaks a rule"));
    }
    if has(ParameterIn::Path) {
        wanted.push(("404", "Not found"));
    }
    if secured {
        wanted.push(("401", "Missing or bad bearer token"));
    }
    wanted.push(("503", "Storage unavailable or the request timed out"));

    let responses = &mut operation.responses.responses;
    for (status, description) in wanted {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(problem(description)));
    }
    // Headers every answer of that status carries.
    for (status, name, ty) in [
        ("401", "WWW-Authenticate", Type::String),
        ("429", "Retry-After", Type::Integer),
        ("503", "Retry-After", Type::Integer),
    ] {
        if let Some(RefOr::T(response)) = responses.get_mut(status) {
            response.headers.entry(name.to_owned()).or_insert_with(|| {
                RefOr::T(
                    HeaderBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(ty)))
                        .build(),
                )
            });
        }
    }
}

fn problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// Error answers are problem documents: their JSON content is
/// `application/problem+json`.
fn problems_as_problem_json(operation: &mut Operation) {
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let error = status.starts_with('4') || status.starts_with('5');
        if !error {
            continue;
        }
        if let Some(content) = response.content.shift_remove("application/json") {
            response.content.insert(PROBLEM_JSON.to_owned(), content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, PathItem};
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::security::SecurityRequirement;
    use utoipa::openapi::{OpenApiBuilder, PathsBuilder};

    fn doc(path: &str, operation: Operation) -> OpenApi {
        OpenApiBuilder::new()
            .paths(PathsBuilder::new().path(path, PathItem::new(HttpMethod::Post, operation)))
            .build()
    }

    fn statuses(doc: &OpenApi, path: &str) -> Vec<String> {
        let item = &doc.paths.paths[path];
        let op = item.post.as_ref().unwrap();
        op.responses.responses.keys().cloned().collect()
    }

    #[test]
    fn adds_the_shared_answers_of_a_protected_json_route_with_an_id() {
        let op = OperationBuilder::new()
            .parameter(
                ParameterBuilder::new()
                    .name("id")
                    .parameter_in(ParameterIn::Path),
            )
            .request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", ContentBuilder::new().build())
                    .build(),
            ))
            .security(SecurityRequirement::new("bearer", Vec::<String>::new()))
            .response("200", ResponseBuilder::new().description("ok"))
            .response(
                "409",
                ResponseBuilder::new().description("taken").content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                ),
            )
            .build();
        let mut d = doc("/v1/things/{id}", op);
        apply_conventions(&mut d);
        assert_eq!(
            statuses(&d, "/v1/things/{id}"),
            [
                "200", "400", "401", "404", "409", "413", "415", "422", "503"
            ]
        );
        let op = d.paths.paths["/v1/things/{id}"].post.as_ref().unwrap();
        let RefOr::T(conflict) = &op.responses.responses["409"] else {
            panic!("inline response expected");
        };
        assert_eq!(conflict.content.keys().collect::<Vec<_>>(), [PROBLEM_JSON]);
        let RefOr::T(unauthorized) = &op.responses.responses["401"] else {
            panic!("inline response expected");
        };
        assert!(unauthorized.headers.contains_key("WWW-Authenticate"));
    }

    #[test]
    fn leaves_operations_routes_alone() {
        let op = OperationBuilder::new()
            .response("200", ResponseBuilder::new().description("ok"))
            .build();
        let mut d = doc("/healthz", op);
        apply_conventions(&mut d);
        assert_eq!(statuses(&d, "/healthz"), ["200"]);
    }
}
