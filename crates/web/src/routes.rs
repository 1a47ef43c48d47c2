//! A service's routes, documented and dispatchable: each route goes into an
//! OpenAPI-documented axum router (the service's part of `/openapi.json`, and the
//! router of last resort) and is also kept as its template and method router, so
//! the observe layer, which matches every request's path anyway (for its latency
//! label), can call the route itself: one route match per request, not two.

use std::convert::Infallible;

use axum::extract::Request;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, Route};
use tower::{Layer, Service};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

/// Builds a service's routes (use like `OpenApiRouter`: `routes`, `layer`,
/// `with_state`).
pub struct ServiceRouter<S = ()> {
    api: OpenApiRouter<S>,
    routes: Vec<(String, MethodRouter<S>)>,
}

impl<S: Clone + Send + Sync + 'static> Default for ServiceRouter<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Clone + Send + Sync + 'static> ServiceRouter<S> {
    pub fn new() -> Self {
        Self {
            api: OpenApiRouter::new(),
            routes: Vec::new(),
        }
    }

    /// Adds what `utoipa_axum::routes!` made: one path, one or more methods.
    pub fn routes(mut self, routes: UtoipaMethodRouter<S>) -> Self {
        let (_, paths, method_router) = &routes;
        for template in paths.paths.keys() {
            let template = if template.is_empty() { "/" } else { template };
            self.routes
                .push((template.to_owned(), method_router.clone()));
        }
        self.api = self.api.routes(routes);
        self
    }

    /// Wraps the routes added so far (not those added later) in `layer`, as
    /// `Router::layer` does.
    pub fn layer<L>(self, layer: L) -> Self
    where
        L: Layer<Route> + Clone + Send + Sync + 'static,
        L::Service: Service<Request> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request>>::Response: IntoResponse + 'static,
        <L::Service as Service<Request>>::Error: Into<Infallible> + 'static,
        <L::Service as Service<Request>>::Future: Send + 'static,
    {
        Self {
            api: self.api.layer(layer.clone()),
            routes: self
                .routes
                .into_iter()
                .map(|(template, route)| (template, route.layer(layer.clone())))
                .collect(),
        }
    }

    pub fn with_state(self, state: S) -> ServiceRoutes {
        ServiceRoutes {
            routes: self
                .routes
                .into_iter()
                .map(|(template, route)| (template, route.with_state(state.clone())))
                .collect(),
            api: self.api.with_state(state),
        }
    }
}

/// Routes ready to serve: merge them into the server's router with
/// [`ServiceRoutes::merge_into`].
pub struct ServiceRoutes {
    api: OpenApiRouter,
    routes: Vec<(String, MethodRouter)>,
}

impl ServiceRoutes {
    /// Adds these routes to `api` (the server's documented router) and to
    /// `routes` (the list the observe layer dispatches with).
    pub fn merge_into(
        self,
        api: OpenApiRouter,
        routes: &mut Vec<(String, MethodRouter)>,
    ) -> OpenApiRouter {
        routes.extend(self.routes);
        api.merge(self.api)
    }
}
