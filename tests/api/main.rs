#![allow(unreachable_pub)] // test-harness items are `pub` for the test modules only

//! Integration tests: the real broker against a real OAuth server (`oidc-provider`, strict:
//! PKCE required, refresh tokens rotate on every use, reuse revokes the grant).

mod alerts;
mod architecture;
mod audit;
mod bad_input;
mod bench;
mod binary;
mod callers;
mod cli;
mod concurrency;
mod discovery;
mod edge;
mod entra;
mod flow;
mod functions;
mod functions_host;
mod key_vault;
mod lease;
mod openapi;
mod presets;
mod proxy;
mod proxy_providers;
mod rotation;
mod sign_in;
mod status_page;
mod storage;
mod support;
mod tenants;
mod timer;
