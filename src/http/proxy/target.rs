//! What a proxied request is aimed at: the route's part (connection, path, query, `tenant`)
//! judged before anything is read, then — with the token record in hand — the full URL
//! under the API base and the provider's own headers (Xero's `xero-tenant-id`).

use std::sync::Arc;

use axum::http::Uri;
use url::Url;

use super::super::code::ErrorCode;
use super::super::{ApiError, AppState};
use super::base::resolve_base;
use super::path::{check_path, split_tenant, target_url};
use super::placeholders::fill_placeholders;
use crate::config::ProxyConfig;
use crate::token::TokenRecord;

/// The route's part of a proxied request, checked (borrowed from the request and the
/// broker's state: nothing is copied on the way).
pub(super) struct Request<'a> {
    connection: &'a str,
    /// The connection's proxy, as its preset describes it.
    proxy: &'a ProxyConfig,
    /// The raw path below `/api/proxy/{connection}/`, as the caller encoded it.
    rest: &'a str,
    /// The query without `tenant`.
    query: Option<String>,
    /// The broker's `tenant` parameter: a Xero organisation.
    pub(super) tenant: Option<String>,
}

/// A request's destination for one token record.
pub(super) struct Target {
    pub(super) url: Url,
    pub(super) base: Url,
    /// Headers the provider needs beside the token.
    pub(super) headers: reqwest::header::HeaderMap,
    pub(super) tenant: Option<String>,
}

impl<'a> Request<'a> {
    /// The connection's proxy and the path: unknown connections answer as /api/refresh
    /// does; a path that could leave the API is refused before anything else happens.
    pub(super) fn read(
        state: &'a Arc<AppState>,
        connection: &'a str,
        uri: &'a Uri,
    ) -> Result<Self, ApiError> {
        state
            .broker
            .provider(connection)
            .map_err(|err| ApiError::from_broker(err, state))?;
        let Some(proxy) = state.proxies.get(connection) else {
            return Err(ApiError::new(
                ErrorCode::NoProxy,
                format!("connection `{connection}` has no proxy: set its api_base_url (and proxy is not false)"),
            ));
        };
        let rest = uri
            .path()
            .strip_prefix("/api/proxy/")
            .and_then(|path| path.strip_prefix(connection))
            .and_then(|path| path.strip_prefix('/'))
            .unwrap_or_default();
        check_path(rest).map_err(ApiError::invalid_request)?;
        let (query, tenant) = split_tenant(uri.query());
        Ok(Self {
            connection,
            proxy,
            rest,
            query,
            tenant,
        })
    }

    /// Where links into the API point instead: this route on the broker's public URL.
    pub(super) fn proxy_prefix(&self, public_url: &Url) -> String {
        format!(
            "{}/api/proxy/{}/",
            public_url.as_str().trim_end_matches('/'),
            self.connection
        )
    }

    /// The URL and headers for `record`: its API base, the path's placeholders filled from
    /// its consent, the organisation picked from it.
    pub(super) fn target(
        &self,
        record: &TokenRecord,
        local_mode: bool,
    ) -> Result<Target, ApiError> {
        let base = resolve_base(&self.proxy.base, record, local_mode)?;
        let rest = fill_placeholders(self.rest, self.proxy.path_values, &record.facts)
            .map_err(ApiError::invalid_request)?;
        let url =
            target_url(&base, &rest, self.query.as_deref()).map_err(ApiError::invalid_request)?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(name) = self.proxy.tenant_header {
            // The organisation recorded at consent, in the header the provider reads it from.
            if let Some(tenant) = record.pick_tenant(self.tenant.as_deref())? {
                let value = reqwest::header::HeaderValue::from_str(&tenant.id)
                    .map_err(|_| ApiError::invalid_request("not a tenant id"))?;
                headers.insert(name, value);
            }
        }
        Ok(Target {
            url,
            base,
            headers,
            tenant: self.tenant.clone(),
        })
    }
}
