// Self-test of the test authorization server: `node tests/upstream/selftest.mjs`
// (after `npm ci` in tests/upstream). Drives server.js the way the broker's
// Rust tests do and checks every part of the contract in README.md.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import { once } from 'node:events';
import { createInterface } from 'node:readline';

const REDIRECT = 'http://127.0.0.1:45678/api/callback';
const clients = [
  { client_id: 'broker', client_secret: 's3cret-basic', redirect_uris: [REDIRECT], token_endpoint_auth_method: 'client_secret_basic' },
  { client_id: 'poster', client_secret: 's3cret-post', redirect_uris: [REDIRECT], token_endpoint_auth_method: 'client_secret_post' },
];

const started = Date.now();
const child = spawn(process.execPath, [new URL('./server.js', import.meta.url).pathname], {
  env: { ...process.env, UPSTREAM_CONFIG: JSON.stringify({ clients, access_token_ttl: 120 }) },
  stdio: ['pipe', 'pipe', 'inherit'],
});
const [line] = await once(createInterface({ input: child.stdout }), 'line');
const issuer = /^LISTENING (http:\/\/127\.0\.0\.1:\d+)$/.exec(line)?.[1];
assert.ok(issuer, `unexpected first line: ${line}`);
console.log(`started in ${Date.now() - started} ms at ${issuer}`);

const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
const { authorization_endpoint: authz, token_endpoint: tokenUrl, introspection_endpoint: introspectUrl } = discovery;
console.log({ authz, tokenUrl, introspectUrl });

const b64url = (buf) => buf.toString('base64url');
const pkce = () => {
  const verifier = b64url(crypto.randomBytes(32));
  return { verifier, challenge: b64url(crypto.createHash('sha256').update(verifier).digest()) };
};

// Browser stand-in: cookie jar (path is ignored, which is fine for one host) and manual redirects.
async function authorize(extra = {}, { jar = new Map(), clientId = 'broker' } = {}) {
  const { verifier, challenge } = pkce();
  const query = new URLSearchParams({
    client_id: clientId, response_type: 'code', redirect_uri: REDIRECT, scope: 'openid offline_access api:read',
    state: 'xyz', code_challenge: challenge, code_challenge_method: 'S256', ...extra,
  });
  let url = `${authz}?${query}`;
  const hops = [];
  for (let i = 0; i < 10; i += 1) {
    const res = await fetch(url, { redirect: 'manual', headers: { cookie: [...jar].map(([k, v]) => `${k}=${v}`).join('; ') } });
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const name = pair.slice(0, pair.indexOf('='));
      if (/expires=Thu, 01 Jan 1970/i.test(c)) jar.delete(name); else jar.set(name, pair.slice(name.length + 1));
    }
    hops.push(`${res.status} ${new URL(url).pathname}`);
    const location = res.headers.get('location');
    if (!location) throw new Error(`no redirect from ${url}: ${res.status} ${await res.text()}`);
    url = new URL(location, url).href;
    if (url.startsWith(REDIRECT)) return { params: new URL(url).searchParams, status: res.status, verifier, hops, jar };
  }
  throw new Error('too many redirects');
}

async function token(form, { auth = 'basic', client = clients[0] } = {}) {
  const headers = { 'content-type': 'application/x-www-form-urlencoded' };
  const body = new URLSearchParams(form);
  if (auth === 'basic') headers.authorization = `Basic ${Buffer.from(`${client.client_id}:${client.client_secret}`).toString('base64')}`;
  else { body.set('client_id', client.client_id); body.set('client_secret', client.client_secret); }
  const res = await fetch(tokenUrl, { method: 'POST', headers, body });
  return { status: res.status, type: res.headers.get('content-type'), text: await res.text() };
}
const json = (r) => JSON.parse(r.text);
const control = (path, body) => fetch(`${issuer}/test/${path}`, { method: 'POST', body: JSON.stringify(body) }).then((r) => r.json());
const stats = () => fetch(`${issuer}/test/stats`).then((r) => r.json());

// 1. Full flow, no prompt parameter.
const first = await authorize();
console.log('hops:', first.hops.join(' -> '), `-> ${first.status} client`, 'cookies:', [...first.jar.keys()]);
assert.equal(first.params.get('state'), 'xyz');
assert.equal(first.params.get('iss'), issuer);
const code = first.params.get('code');
assert.ok(code);

// PKCE: a missing or wrong code_verifier is rejected; plain and absent challenges are refused at /auth.
let r = await token({ grant_type: 'authorization_code', code, redirect_uri: REDIRECT });
assert.equal(json(r).error, 'invalid_grant', r.text);
const second = await authorize();
r = await token({ grant_type: 'authorization_code', code: second.params.get('code'), redirect_uri: REDIRECT, code_verifier: pkce().verifier });
assert.equal(json(r).error, 'invalid_grant', r.text);
const plain = await authorize({ code_challenge_method: 'plain' });
assert.equal(plain.params.get('error'), 'invalid_request');
console.log('plain PKCE ->', Object.fromEntries(plain.params));
const bareQuery = new URLSearchParams({ client_id: 'broker', response_type: 'code', redirect_uri: REDIRECT, scope: 'openid', state: 's' });
const bare = new URL((await fetch(`${authz}?${bareQuery}`, { redirect: 'manual' })).headers.get('location')).searchParams;
assert.equal(bare.get('error'), 'invalid_request');
console.log('no PKCE ->', Object.fromEntries(bare));

const fresh = await authorize();
r = await token({ grant_type: 'authorization_code', code: fresh.params.get('code'), redirect_uri: REDIRECT, code_verifier: fresh.verifier });
assert.equal(r.status, 200, r.text);
const t0 = json(r);
console.log('code exchange:', Object.fromEntries(Object.entries(t0).map(([k, v]) => [k, k.endsWith('token') ? '…' : v])));
assert.ok(t0.refresh_token && t0.access_token && t0.expires_in === 120 && t0.scope.includes('api:read'));

// 2. Rotation on every refresh.
r = await token({ grant_type: 'refresh_token', refresh_token: t0.refresh_token });
const t1 = json(r);
assert.ok(t1.refresh_token && t1.refresh_token !== t0.refresh_token, r.text);
r = await token({ grant_type: 'refresh_token', refresh_token: t1.refresh_token });
const t2 = json(r);
assert.ok(t2.refresh_token && t2.refresh_token !== t1.refresh_token, r.text);

// 3. Introspection with the token endpoint credentials.
const basic = `Basic ${Buffer.from('broker:s3cret-basic').toString('base64')}`;
const intro = await (await fetch(introspectUrl, {
  method: 'POST', headers: { authorization: basic }, body: new URLSearchParams({ token: t2.access_token }),
})).json();
console.log('introspection:', intro);
assert.equal(intro.active, true);

// 4. Reuse of a rotated refresh token revokes the grant: even the newest one dies.
r = await token({ grant_type: 'refresh_token', refresh_token: t0.refresh_token });
assert.equal(json(r).error, 'invalid_grant', r.text);
r = await token({ grant_type: 'refresh_token', refresh_token: t2.refresh_token });
assert.equal(json(r).error, 'invalid_grant', r.text);
const introAfter = await (await fetch(introspectUrl, {
  method: 'POST', headers: { authorization: basic }, body: new URLSearchParams({ token: t2.access_token }),
})).json();
assert.equal(introAfter.active, false);

// 5. client_secret_post client, with prompt=consent, and with a reused browser session.
const post = await authorize({ prompt: 'consent' }, { clientId: 'poster' });
r = await token({ grant_type: 'authorization_code', code: post.params.get('code'), redirect_uri: REDIRECT, code_verifier: post.verifier }, { auth: 'post', client: clients[1] });
assert.ok(json(r).refresh_token, r.text);
const again = await authorize({}, { jar: first.jar });
console.log('second authorization with existing session:', again.hops.join(' -> '));
r = await token({ grant_type: 'authorization_code', code: again.params.get('code'), redirect_uri: REDIRECT, code_verifier: again.verifier });
const tAgain = json(r);
assert.ok(tAgain.refresh_token, r.text);

// Revocation works, and the registered client auth method is enforced (basic client, post credentials).
const revoked = await fetch(discovery.revocation_endpoint, {
  method: 'POST', headers: { authorization: basic }, body: new URLSearchParams({ token: tAgain.refresh_token }),
});
assert.equal(revoked.status, 200);
r = await token({ grant_type: 'refresh_token', refresh_token: tAgain.refresh_token });
assert.equal(json(r).error, 'invalid_grant', r.text);
r = await token({ grant_type: 'refresh_token', refresh_token: 'x' }, { auth: 'post' });
assert.deepEqual([r.status, json(r).error], [401, 'invalid_client']);
const loginOnly = await authorize({ prompt: 'login' });
r = await token({ grant_type: 'authorization_code', code: loginOnly.params.get('code'), redirect_uri: REDIRECT, code_verifier: loginOnly.verifier });
console.log('prompt=login scope:', json(r).scope, 'refresh_token:', Boolean(json(r).refresh_token));

// 6. Denial.
const denied = await authorize({ test_deny: '1' });
console.log('deny:', Object.fromEntries(denied.params));
assert.equal(denied.params.get('error'), 'access_denied');
assert.equal(denied.params.get('state'), 'xyz');

// 7. fail-next and delay.
await control('fail-next', { count: 2, status: 502, body: '<html>bad gateway', content_type: 'text/html' });
for (let i = 0; i < 2; i += 1) {
  r = await token({ grant_type: 'refresh_token', refresh_token: 'whatever' });
  assert.deepEqual([r.status, r.type, r.text], [502, 'text/html', '<html>bad gateway']);
}
r = await token({ grant_type: 'refresh_token', refresh_token: 'whatever' });
assert.equal(json(r).error, 'invalid_grant');
await control('delay', { ms: 300 });
const t = Date.now();
await Promise.all([1, 2].map(() => token({ grant_type: 'refresh_token', refresh_token: 'x' })));
assert.ok(Date.now() - t >= 300 && Date.now() - t < 550, `${Date.now() - t} ms`);
await control('delay', { ms: 0 });

// 8. Stats saw every secret value that crossed the wire.
const s = await stats();
console.log('stats:', JSON.stringify({ ...s, seen: Object.fromEntries(Object.entries(s.seen).map(([k, v]) => [k, v.length])) }));
for (const tk of [t0, t1, t2]) {
  assert.ok(s.seen.access_tokens.includes(tk.access_token));
  assert.ok(s.seen.refresh_tokens.includes(tk.refresh_token));
}
assert.ok(s.seen.codes.includes(code) && s.seen.code_verifiers.includes(fresh.verifier));
assert.ok(s.seen.client_secrets.includes('s3cret-basic') && s.seen.client_secrets.includes('s3cret-post'));
assert.equal(s.token_requests.authorization_code, 6);
assert.equal(s.token_requests.refresh_token, 11);
assert.deepEqual(s.token_errors, { invalid_grant: 8, invalid_client: 1 });
assert.equal(s.grants_revoked, 2);

child.stdin.end(); // closing stdin must stop the server
const [exitCode] = await once(child, 'exit');
assert.equal(exitCode, 0);
console.log('selftest: 1 passed, 0 failed');
