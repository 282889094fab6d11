// Test authorization server for the broker's integration tests: a real
// oidc-provider (panva) configured strictly, with auto-completed interactions
// and a few /test/* control endpoints. The contract is described in README.md.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';

// A throwaway signing key per run keeps the provider from falling back to its
// published development keys (and from warning about it). Generating it on the
// threadpool while oidc-provider loads saves ~150 ms of startup.
const keyPair = promisify(crypto.generateKeyPair)('rsa', { modulusLength: 2048 });
const { default: Provider } = await import('oidc-provider');
// Reused so we get the library's own grant bookkeeping (needed for reuse
// detection / revokeByGrantId), but with an unbounded store: the built-in one
// is an LRU capped at 1000 entries that could silently evict grants in long runs.
const { default: MemoryAdapter } = await import('oidc-provider/lib/adapters/memory_adapter.js');

// stdout carries exactly one line (LISTENING ...); oidc-provider prints its
// notices with console.info, so route every console method to stderr.
console.log = console.info = console.debug = console.error;

const fail = (msg) => { console.error(`upstream: ${msg}`); process.exit(2); };

let config;
try {
  config = JSON.parse(process.env.UPSTREAM_CONFIG ?? '');
} catch (err) {
  fail(`UPSTREAM_CONFIG must be JSON (${err.message})`);
}
if (!Array.isArray(config?.clients) || config.clients.length === 0) fail('UPSTREAM_CONFIG.clients must be a non-empty array');

const DAY = 24 * 60 * 60;
const accessTokenTtl = config.access_token_ttl ?? 3600;
const port = Number(process.env.UPSTREAM_PORT ?? 0);

const stats = {
  token_requests: { authorization_code: 0, refresh_token: 0 },
  token_errors: { invalid_grant: 0 },
  grants_revoked: 0,
  seen: {
    codes: [], code_verifiers: [], refresh_tokens: [], access_tokens: [],
    client_secrets: config.clients.map((c) => c.client_secret).filter(Boolean),
  },
};
const see = (list, value) => { if (value && !stats.seen[list].includes(value)) stats.seen[list].push(value); };
const bump = (obj, key) => { obj[key] = (obj[key] ?? 0) + 1; };
let failNext = { count: 0 };
let delayMs = 0;

// The get / set(maxAge) / delete surface MemoryAdapter expects of its store.
const entries = new Map();
const store = {
  get(key) {
    const entry = entries.get(key);
    if (entry && entry.expiresAt <= Date.now()) entries.delete(key);
    else return entry?.value;
    return undefined;
  },
  set(key, value, { maxAge } = {}) { entries.set(key, { value, expiresAt: maxAge === undefined ? Infinity : Date.now() + maxAge }); },
  delete(key) { entries.delete(key); },
};

const { privateKey } = await keyPair;
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test', use: 'sig', alg: 'RS256' };

// Chosen before the provider exists because the issuer must contain the port.
const server = http.createServer();
await new Promise((resolve) => {
  server.once('error', (err) => fail(`cannot listen on 127.0.0.1:${port}: ${err.message}`));
  server.listen(port, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  adapter: (model) => new MemoryAdapter(model, store),
  jwks: { keys: [jwk] },
  clients: config.clients.map((c) => ({ grant_types: ['authorization_code', 'refresh_token'], response_types: ['code'], ...c })),
  responseTypes: ['code'],
  scopes: ['openid', 'offline_access', 'api:read'],
  extraParams: ['test_deny'],
  // Real providers insist on redirect_uri; so do we, so the broker can't rely on the shortcut.
  allowOmittingSingleRegisteredRedirectUri: false,
  // oidc-provider only supports S256, so "required" means "S256 required".
  pkce: { required: () => true },
  // Same as the library default, stated here because the tests depend on it:
  // a refresh token exists iff offline_access survived into the grant.
  issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  // Rotate on every use; presenting a rotated token then revokes the whole grant
  // (the library's built-in reuse detection in the refresh_token grant).
  rotateRefreshToken: () => true,
  // Every TTL is explicit: the library's defaults print a notice when used.
  ttl: {
    AccessToken: accessTokenTtl, AuthorizationCode: 60, IdToken: 3600, Interaction: 3600,
    RefreshToken: 14 * DAY, Grant: 14 * DAY, Session: 14 * DAY,
  },
  cookies: { keys: ['upstream-test-cookie-key-1', 'upstream-test-cookie-key-2'] },
  findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    introspection: { enabled: true, allowedPolicy: async () => true },
    revocation: { enabled: true, allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId },
  },
  clientBasedCORS: () => false,
  // Machine-readable errors for the rare cases that cannot be redirected to the client.
  renderError: async (ctx, out) => { ctx.type = 'json'; ctx.body = out; },
});

provider.on('authorization_code.saved', (code) => see('codes', code.jti));
provider.on('access_token.saved', (token) => see('access_tokens', token.jti));
provider.on('refresh_token.saved', (token) => see('refresh_tokens', token.jti));
provider.on('grant.revoked', () => { stats.grants_revoked += 1; });
provider.on('server_error', (ctx, err) => console.error('upstream: server_error', err));

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

function credentials(form, authorization) {
  const [scheme, value] = (authorization ?? '').split(' ');
  if (scheme?.toLowerCase() === 'basic' && value) {
    const decoded = Buffer.from(value, 'base64').toString('utf8');
    const i = decoded.indexOf(':');
    const dec = (s) => { try { return decodeURIComponent(s.replace(/\+/g, '%20')); } catch { return s; } };
    return i < 0 ? {} : { method: 'client_secret_basic', clientId: dec(decoded.slice(0, i)), secret: dec(decoded.slice(i + 1)) };
  }
  if (form.client_secret !== undefined) return { method: 'client_secret_post', clientId: form.client_id, secret: form.client_secret };
  return {};
}

const registeredMethod = new Map(config.clients.map((c) => [c.client_id, c.token_endpoint_auth_method ?? 'client_secret_basic']));

// Token, introspection and revocation requests. The body is read here, before
// the provider, so every request is counted at the HTTP level (even canned and
// malformed ones); it is then handed over as req.body, which oidc-provider
// supports (it warns once on stderr about an "already parsed request body").
async function clientEndpoint(req, res, path) {
  const raw = await readBody(req);
  const form = Object.fromEntries(new URLSearchParams(raw));
  const creds = credentials(form, req.headers.authorization);
  see('client_secrets', creds.secret);
  if (path === '/token') {
    bump(stats.token_requests, form.grant_type || 'unknown');
    see('code_verifiers', form.code_verifier);
    if (delayMs > 0) await sleep(delayMs);
    if (failNext.count > 0) {
      failNext.count -= 1;
      const { status, body, contentType } = failNext;
      res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(body) });
      return res.end(body);
    }
  }
  // oidc-provider treats client_secret_basic and client_secret_post as
  // interchangeable; a strict provider must not, or a broker sending the wrong
  // one would go unnoticed.
  const expected = registeredMethod.get(creds.clientId);
  if (creds.method && expected && creds.method !== expected) {
    if (path === '/token') bump(stats.token_errors, 'invalid_client');
    return sendJson(res, 401, { error: 'invalid_client', error_description: `client must authenticate with ${expected}` });
  }
  req.body = raw;
  return providerHandler(req, res);
}

// oidc-provider strips offline_access from any authorization request whose
// prompt lacks "consent" (OIDC Core 11), so no refresh token would ever be
// issued to a plain OAuth client. Adding consent server-side makes the
// (auto-completed) consent step always run and offline_access survive. The
// same forced interaction guarantees test_deny=1 is seen even when a session
// and grant already exist. prompt=none is left alone: it must stand alone.
provider.use(async (ctx, next) => {
  const { scope, test_deny: deny } = ctx.query;
  if (ctx.method === 'GET' && ctx.path === '/auth' && (scope?.split(' ').includes('offline_access') || deny === '1')) {
    const prompt = new Set(ctx.query.prompt?.split(' ').filter(Boolean));
    if (!prompt.has('none') && !prompt.has('consent')) {
      prompt.add('consent');
      ctx.query = { ...ctx.query, prompt: [...prompt].join(' ') };
    }
  }
  await next();
  if (ctx.path === '/token' && ctx.body?.error) bump(stats.token_errors, ctx.body.error);
});

// Plays the user: always logs in as test-user and consents to everything asked,
// unless the authorization request carried test_deny=1.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  let result;
  if (params.test_deny === '1') {
    result = { error: 'access_denied', error_description: 'The user denied access' };
  } else if (prompt.name === 'login') {
    result = { login: { accountId: 'test-user' } };
  } else if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [resource, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(resource, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  } else {
    throw new Error(`unexpected prompt ${prompt.name}`);
  }
  // Consent must keep the login result of the previous interaction: without the
  // merge a prompt=login request would ask for login again, forever.
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: prompt.name === 'consent' });
}

function sendJson(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

async function testControl(req, res, path) {
  if (req.method === 'GET' && path === '/test/stats') return sendJson(res, 200, stats);
  if (req.method !== 'POST') return sendJson(res, 405, { error: 'method not allowed' });
  const input = JSON.parse((await readBody(req)) || '{}');
  if (path === '/test/fail-next') {
    failNext = { count: input.count ?? 1, status: input.status ?? 500, body: input.body ?? '', contentType: input.content_type ?? 'application/json' };
    return sendJson(res, 200, { ok: true });
  }
  if (path === '/test/delay') {
    delayMs = input.ms ?? 0;
    return sendJson(res, 200, { ok: true });
  }
  return sendJson(res, 404, { error: 'unknown test endpoint' });
}

// Composed only now: koa freezes the middleware list (provider.use) here.
const providerHandler = provider.callback();
server.on('request', async (req, res) => {
  const path = new URL(req.url, issuer).pathname;
  try {
    if (path.startsWith('/test/')) return await testControl(req, res, path);
    if (req.method === 'GET' && path.startsWith('/interaction/')) return await interaction(req, res);
    if (req.method === 'POST' && ['/token', '/token/introspection', '/token/revocation'].includes(path)) return await clientEndpoint(req, res, path);
    return providerHandler(req, res);
  } catch (err) {
    console.error(`upstream: ${req.method} ${path} failed:`, err);
    if (!res.headersSent) sendJson(res, 500, { error: 'test_server_error', error_description: String(err.message) });
    else res.end();
    return undefined;
  }
});

// Never outlive the test that started us: stop on signals, and when our stdin
// pipe closes (the parent died or dropped it). Only a pipe/socket is watched:
// /dev/null would report EOF at once, and reading a terminal could stop us
// with SIGTTIN when the test runs in the background.
const shutdown = () => { server.close(); process.exit(0); };
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
let stdinKind;
try { stdinKind = fs.fstatSync(0); } catch { /* fd 0 closed */ }
if (stdinKind?.isFIFO() || stdinKind?.isSocket()) {
  for (const event of ['end', 'close', 'error']) process.stdin.on(event, shutdown);
  process.stdin.resume();
}

process.stdout.write(`LISTENING ${issuer}\n`);
