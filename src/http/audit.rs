//! The HTTP side of the audit trail (`crate::audit`): who is calling, for which connection,
//! on which route, and what they were given or refused.

use axum::http::HeaderMap;

use super::{invocation_id, ApiError, AppState};
use crate::audit::{Handout, Refusal, Source};
use crate::auth::{AuthError, Caller, Role};
use crate::token::TokenRecord;

/// The caller of a route that hands out `connection`'s tokens: authenticated, and one the
/// connection serves. A refused authenticated caller is written to the audit trail; an
/// attempt without valid credentials is counted.
pub(super) async fn caller_of(
    state: &AppState,
    headers: &HeaderMap,
    connection: &str,
    route: &str,
) -> Result<Caller, ApiError> {
    let caller = match state.auth.authenticate(headers, Role::Caller).await {
        Ok(caller) => caller,
        Err(err) => {
            if let AuthError::PrincipalNotAllowed(object_id, _) = &err {
                let object_id = object_id.clone();
                let error = ApiError::from(err);
                refused_as(state, headers, connection, route, &object_id, None, &error);
                return Err(error);
            }
            state.audit.unauthenticated(state.broker.now());
            return Err(err.into());
        }
    };
    if let Err(err) = state.auth.may_take(&caller, connection) {
        let error = ApiError::from(err);
        refused(state, headers, &caller, connection, route, &error);
        return Err(error);
    }
    Ok(caller)
}

/// Writes `token_issued` for `record`'s access token, handed to `caller`.
#[allow(clippy::too_many_arguments)]
pub(super) fn issued(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    connection: &str,
    route: &str,
    tenant: Option<&str>,
    source: Source,
    record: &TokenRecord,
) {
    let Some(token) = &record.access_token else {
        return;
    };
    issued_token(
        state,
        headers,
        caller,
        connection,
        route,
        tenant,
        source,
        &crate::audit::token_id(token),
        record.expires_at.map(crate::audit::timestamp).as_deref(),
    );
}

/// [`issued`] with the fingerprint already taken (the cached answer keeps it).
#[allow(clippy::too_many_arguments)]
pub(super) fn issued_token(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    connection: &str,
    route: &str,
    tenant: Option<&str>,
    source: Source,
    token_id: &str,
    expires_at: Option<&str>,
) {
    state.audit.issued(&Handout {
        connection,
        caller: caller.name(),
        app_id: app_id(caller),
        route,
        tenant,
        source,
        token_id,
        expires_at,
        invocation_id: invocation_id(headers),
    });
}

/// Writes `token_refused` when `error` refuses `caller` (403, 409, 429 or 5xx); the other
/// answers (a bad parameter, an unknown connection or tenant) are the caller's mistakes,
/// not refusals.
pub(super) fn refused(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    connection: &str,
    route: &str,
    error: &ApiError,
) {
    refused_as(
        state,
        headers,
        connection,
        route,
        caller.name(),
        app_id(caller),
        error,
    );
}

fn refused_as(
    state: &AppState,
    headers: &HeaderMap,
    connection: &str,
    route: &str,
    caller: &str,
    app_id: Option<&str>,
    error: &ApiError,
) {
    let status = error.status.as_u16();
    if matches!(status, 403 | 409 | 429) || status >= 500 {
        state.audit.refused(&Refusal {
            connection,
            caller,
            app_id,
            route,
            code: error.code().as_str(),
            status,
            invocation_id: invocation_id(headers),
        });
    }
}

fn app_id(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Principal { app_id, .. } => app_id.as_deref(),
        _ => None,
    }
}
