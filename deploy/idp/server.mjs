#!/usr/bin/env node
// vpnr lab OpenID Provider.
//
// A small wrapper around the `oidc-provider` package (a certified OP) that
// takes its users and clients from a JSON file, renders its own minimal
// login pages (plain HTML forms, no JavaScript needed), consents
// automatically and exposes a tiny admin API used by the tests.
//
// stdout carries exactly one line: {"ready": true, ...} once listening.
// Everything else (including oidc-provider notices) goes to stderr.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { createLocalJWKSet, jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';

// oidc-provider prints notices with console.info; keep stdout clean.
console.log = (...args) => console.error(...args);
console.info = (...args) => console.error(...args);
console.debug = (...args) => console.error(...args);

const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const GRANT_ALIASES = { device_code: DEVICE_CODE_GRANT };
const SCIM_READ_SCOPE = 'scim:read';
const DEFAULT_RESOURCES = [{ identifier: 'urn:vpnr', scope: `vpn ${SCIM_READ_SCOPE}` }];
const MAX_BODY = 64 * 1024;
const DAY = 24 * 60 * 60;

const SCIM_USER_SCHEMA = 'urn:ietf:params:scim:schemas:core:2.0:User';
const SCIM_GROUP_SCHEMA = 'urn:ietf:params:scim:schemas:core:2.0:Group';
const SCIM_DEVICE_SCHEMA = 'urn:vpnr:params:scim:schemas:extension:device:2.0:User';
const SCIM_LIST_SCHEMA = 'urn:ietf:params:scim:api:messages:2.0:ListResponse';
const SCIM_ERROR_SCHEMA = 'urn:ietf:params:scim:api:messages:2.0:Error';
const SCIM_CONTENT_TYPE = 'application/scim+json; charset=utf-8';
const SCIM_DEFAULT_COUNT = 100;
const SCIM_MAX_COUNT = 1000;
const SCIM_MAX_FILTER = 1000;
const SCIM_SLOW_MS = 3000;
const SCIM_FAULTS = new Set(['none', 'http500', 'garbage', 'truncate', 'slow']);

// ---------------------------------------------------------------- options

function fail(message) {
  console.error(`vpnr-idp: ${message}`);
  process.exit(2);
}

function parseOptions() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        port: { type: 'string' },
        host: { type: 'string' },
        issuer: { type: 'string' },
        data: { type: 'string' },
        keys: { type: 'string' },
        'admin-token': { type: 'string' },
        'access-token-ttl': { type: 'string' },
        'gen-keys': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (err) {
    fail(err.message);
  }
  if (parsed.help) {
    process.stderr.write(`usage: node server.mjs --data FILE [--port N] [--host H] [--issuer URL]
                       [--keys JWKS_FILE] [--admin-token TOKEN] [--access-token-ttl SECONDS]
       node server.mjs --gen-keys JWKS_FILE
env fallbacks: VPNR_IDP_PORT VPNR_IDP_HOST VPNR_IDP_ISSUER VPNR_IDP_DATA VPNR_IDP_KEYS
               VPNR_IDP_ADMIN_TOKEN VPNR_IDP_ACCESS_TOKEN_TTL
`);
    process.exit(0);
  }
  const env = process.env;
  const opt = {
    port: parsed.port ?? env.VPNR_IDP_PORT ?? '9080',
    host: parsed.host ?? env.VPNR_IDP_HOST ?? '127.0.0.1',
    issuer: parsed.issuer ?? env.VPNR_IDP_ISSUER ?? undefined,
    data: parsed.data ?? env.VPNR_IDP_DATA ?? undefined,
    keys: parsed.keys ?? env.VPNR_IDP_KEYS ?? undefined,
    adminToken: parsed['admin-token'] ?? env.VPNR_IDP_ADMIN_TOKEN ?? undefined,
    accessTokenTTL: parsed['access-token-ttl'] ?? env.VPNR_IDP_ACCESS_TOKEN_TTL ?? '3600',
    genKeys: parsed['gen-keys'],
  };
  if (opt.genKeys) return opt;
  if (!/^\d+$/.test(opt.port) || Number(opt.port) > 65535) fail(`invalid --port ${opt.port}`);
  opt.port = Number(opt.port);
  if (!/^\d+$/.test(opt.accessTokenTTL) || Number(opt.accessTokenTTL) < 1) {
    fail(`invalid --access-token-ttl ${opt.accessTokenTTL}`);
  }
  opt.accessTokenTTL = Number(opt.accessTokenTTL);
  if (!opt.data) fail('--data FILE is required');
  if (opt.adminToken === '') opt.adminToken = undefined;
  return opt;
}

// ---------------------------------------------------------------- keys

function thumbprint(jwk) {
  const canonical = JSON.stringify({ e: jwk.e, kty: jwk.kty, n: jwk.n });
  return crypto.createHash('sha256').update(canonical).digest('base64url');
}

function generateSigningKey() {
  // Not `generateKeyPairSync(...).privateKey.export({format: 'jwk'})`: on
  // Node 20 that deadlocks now and then (a GC run during the JWK export
  // destroys the key generation job, which waits for the key's mutex the
  // export holds).  Going through PEM gives the exported key its own data.
  const { privateKey: pem } = crypto.generateKeyPairSync('rsa', {
    modulusLength: 2048,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
  const jwk = crypto.createPrivateKey(pem).export({ format: 'jwk' });
  return { ...jwk, kid: thumbprint(jwk), alg: 'RS256', use: 'sig' };
}

function loadKeys(file) {
  let doc;
  try {
    doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    fail(`cannot read keys file ${file}: ${err.message}`);
  }
  const keys = Array.isArray(doc) ? doc : doc?.keys;
  if (!Array.isArray(keys) || keys.length === 0) fail(`keys file ${file}: expected {"keys": [...]}`);
  const out = keys.map((k) => {
    if (k.kty !== 'RSA' || !k.d) fail(`keys file ${file}: only private RSA JWKs are supported`);
    return { alg: 'RS256', use: 'sig', kid: thumbprint(k), ...k };
  });
  return out;
}

// ---------------------------------------------------------------- data file

function asStringList(value, what) {
  if (value === undefined) return [];
  if (!Array.isArray(value) || value.some((v) => typeof v !== 'string')) {
    throw new Error(`${what} must be a list of strings`);
  }
  return [...value];
}

function asNonEmptyStringList(value, what) {
  const list = asStringList(value, what);
  if (list.some((v) => !v)) throw new Error(`${what} must be a list of non-empty strings`);
  return list;
}

// `where` names the user in error messages (`users[3]` for the data file).
function normalizeUser(u, where) {
  if (!u || typeof u !== 'object' || Array.isArray(u)) throw new Error(`${where} must be an object`);
  for (const field of ['sub', 'username', 'password']) {
    if (typeof u[field] !== 'string' || !u[field]) throw new Error(`${where}.${field} must be a non-empty string`);
  }
  let address;
  if (typeof u.address === 'string') address = { formatted: u.address };
  else if (u.address && typeof u.address === 'object') address = { ...u.address };
  return {
    sub: u.sub,
    username: u.username,
    password: u.password,
    email: typeof u.email === 'string' ? u.email : undefined,
    name: typeof u.name === 'string' ? u.name : undefined,
    groups: asStringList(u.groups, `${where}.groups`),
    active: u.active !== false,
    address,
    // Static addresses of devices/servers, served through SCIM only; the IdP
    // does not interpret them.
    ipAddresses: asNonEmptyStringList(u.ip_addresses, `${where}.ip_addresses`),
  };
}

function normalizeClient(c, i) {
  if (!c || typeof c !== 'object') throw new Error(`clients[${i}] must be an object`);
  if (typeof c.client_id !== 'string' || !c.client_id) throw new Error(`clients[${i}].client_id must be a non-empty string`);
  const m = structuredClone(c);
  m.grant_types = asStringList(c.grant_types ?? ['authorization_code'], `clients[${i}].grant_types`)
    .map((g) => GRANT_ALIASES[g] ?? g);
  m.redirect_uris = asStringList(c.redirect_uris, `clients[${i}].redirect_uris`);
  if (m.response_types === undefined) {
    m.response_types = m.grant_types.includes('authorization_code') ? ['code'] : [];
  }
  if (m.token_endpoint_auth_method === undefined) {
    m.token_endpoint_auth_method = m.client_secret ? 'client_secret_basic' : 'none';
  }
  return m;
}

function normalizeResource(r, i) {
  if (!r || typeof r.identifier !== 'string' || !URL.canParse(r.identifier)) {
    throw new Error(`resources[${i}].identifier must be an absolute URI`);
  }
  return {
    identifier: r.identifier,
    scope: typeof r.scope === 'string' ? r.scope : '',
    audience: typeof r.audience === 'string' ? r.audience : r.identifier,
    accessTokenTTL: Number.isInteger(r.access_token_ttl) ? r.access_token_ttl : undefined,
  };
}

function readDataFile(file) {
  const doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  if (!doc || typeof doc !== 'object') throw new Error('top level must be an object');
  const users = new Map();
  for (const [i, raw] of (doc.users ?? []).entries()) {
    const u = normalizeUser(raw, `users[${i}]`);
    if (users.has(u.sub)) throw new Error(`duplicate user sub ${u.sub}`);
    users.set(u.sub, u);
  }
  const clients = new Map();
  for (const [i, raw] of (doc.clients ?? []).entries()) {
    const c = normalizeClient(raw, i);
    if (clients.has(c.client_id)) throw new Error(`duplicate client_id ${c.client_id}`);
    clients.set(c.client_id, c);
  }
  const resources = (doc.resources ?? DEFAULT_RESOURCES).map(normalizeResource);
  return { users, clients, resources };
}

// ---------------------------------------------------------------- storage

// Process-local storage for oidc-provider's models (sessions, grants,
// codes, tokens...). Clients are served read-only from the data file, so a
// reload of the data file takes effect for clients too.
const GRANT_BOUND = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode', 'BackchannelAuthenticationRequest']);

function makeAdapterClass(getState) {
  const entries = new Map(); // key -> { value, expiresAt (ms) }

  const read = (key) => {
    const e = entries.get(key);
    if (!e) return undefined;
    if (e.expiresAt <= Date.now()) {
      entries.delete(key);
      return undefined;
    }
    return e.value;
  };
  const write = (key, value, expiresAt) => entries.set(key, { value, expiresAt });

  const sweeper = setInterval(() => {
    const now = Date.now();
    for (const [key, e] of entries) {
      if (e.expiresAt <= now) entries.delete(key);
      else if (key.startsWith('grant:')) {
        for (const member of e.value) if (!entries.has(member)) e.value.delete(member);
        if (e.value.size === 0) entries.delete(key);
      }
    }
  }, 30_000);
  sweeper.unref();

  return class LabAdapter {
    constructor(model) {
      this.model = model;
    }

    key(id) {
      return `${this.model}:${id}`;
    }

    async upsert(id, payload, expiresIn) {
      if (this.model === 'Client') throw new Error('clients come from the data file and are read-only');
      const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
      write(this.key(id), payload, expiresAt);
      if (this.model === 'Session' && payload.uid) write(`sessionUid:${payload.uid}`, id, expiresAt);
      if (payload.userCode) write(`userCode:${payload.userCode}`, id, expiresAt);
      if (payload.grantId && GRANT_BOUND.has(this.model)) {
        const gk = `grant:${payload.grantId}`;
        const members = read(gk) ?? new Set();
        members.add(this.key(id));
        write(gk, members, Infinity);
      }
    }

    async find(id) {
      if (this.model === 'Client') {
        const c = getState().clients.get(id);
        return c ? structuredClone(c) : undefined;
      }
      return read(this.key(id));
    }

    async findByUid(uid) {
      const id = read(`sessionUid:${uid}`);
      return id === undefined ? undefined : this.find(id);
    }

    async findByUserCode(userCode) {
      const id = read(`userCode:${userCode}`);
      return id === undefined ? undefined : this.find(id);
    }

    async consume(id) {
      const payload = read(this.key(id));
      if (payload) payload.consumed = Math.floor(Date.now() / 1000);
    }

    async destroy(id) {
      entries.delete(this.key(id));
    }

    async revokeByGrantId(grantId) {
      const gk = `grant:${grantId}`;
      for (const member of read(gk) ?? []) entries.delete(member);
      entries.delete(gk);
    }
  };
}

// ---------------------------------------------------------------- html

const esc = (value) => String(value ?? '').replace(/[&<>"']/g, (ch) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[ch]));

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:sans-serif;max-width:28em;margin:2em auto}.error{color:#b00}input{display:block;margin:.3em 0 .8em}</style>
</head>
<body>
<h1>${esc(title)}</h1>
${body}
</body>
</html>
`;
}

// ---------------------------------------------------------------- helpers

function safeEqual(a, b) {
  const ha = crypto.createHash('sha256').update(String(a)).digest();
  const hb = crypto.createHash('sha256').update(String(b)).digest();
  return crypto.timingSafeEqual(ha, hb);
}

async function readBody(ctx) {
  const chunks = [];
  let size = 0;
  for await (const chunk of ctx.req) {
    size += chunk.length;
    if (size > MAX_BODY) ctx.throw(413, 'request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readForm(ctx) {
  if (!ctx.is('application/x-www-form-urlencoded')) ctx.throw(415, 'expected a urlencoded form');
  return Object.fromEntries(new URLSearchParams(await readBody(ctx)));
}

async function readJson(ctx) {
  const text = await readBody(ctx);
  if (!text) return {};
  try {
    return JSON.parse(text);
  } catch {
    ctx.throw(400, 'invalid JSON body');
  }
  return undefined;
}

function publicUser(u) {
  return {
    sub: u.sub,
    username: u.username,
    email: u.email,
    groups: u.groups,
    active: u.active,
    ip_addresses: u.ipAddresses,
  };
}

// ---------------------------------------------------------------- SCIM

// Group ids: "g-" + name when the name consists of URL-unreserved characters
// only (A-Z a-z 0-9 . _ ~ -), else "g64-" + base64url(UTF-8 name).  Both
// forms are deterministic and never collide ("g-" vs "g6").
function scimGroupId(name) {
  return /^[A-Za-z0-9._~-]+$/.test(name) ? `g-${name}` : `g64-${Buffer.from(name, 'utf8').toString('base64url')}`;
}

class ScimError extends Error {
  constructor(status, detail, scimType) {
    super(detail);
    this.status = status;
    this.scimType = scimType;
  }
}

// A SCIM filter restricted to `attr eq value` comparisons joined by `and`.
// `attrs` maps lower-cased attribute names to
// {type: 'string'|'boolean', get(item), caseExact}.  Returns a predicate.
function parseScimFilter(text, attrs) {
  const invalid = (why) => new ScimError(400, `unsupported or invalid filter: ${why}`, 'invalidFilter');
  if (text.length > SCIM_MAX_FILTER) throw invalid('too long');
  const tokens = [];
  const re = /\s*(?:"((?:[^"\\]|\\.)*)"|([^\s"()[\]]+)|(\S))/y;
  re.lastIndex = 0;
  while (re.lastIndex < text.length) {
    const m = re.exec(text);
    if (!m) break; // only trailing whitespace is left
    if (m[3] !== undefined) throw invalid(`unexpected "${m[3]}"`);
    if (m[1] !== undefined) {
      let value;
      try {
        value = JSON.parse(`"${m[1]}"`);
      } catch {
        throw invalid('bad string literal');
      }
      tokens.push({ str: value });
    } else {
      tokens.push({ word: m[2] });
    }
  }
  const clauses = [];
  let i = 0;
  for (;;) {
    const [attrTok, opTok, valTok] = tokens.slice(i, i + 3);
    if (!attrTok?.word) throw invalid('expected an attribute name');
    const attr = attrs[attrTok.word.toLowerCase()];
    if (!attr) throw invalid(`attribute ${attrTok.word} is not filterable`);
    if (!opTok?.word || opTok.word.toLowerCase() !== 'eq') throw invalid('only the "eq" operator is supported');
    if (!valTok) throw invalid('expected a value');
    let value;
    if (attr.type === 'boolean') {
      const w = valTok.word?.toLowerCase();
      if (w !== 'true' && w !== 'false') throw invalid(`${attrTok.word} compares with true or false`);
      value = w === 'true';
      clauses.push((item) => attr.get(item) === value);
    } else {
      if (valTok.str === undefined) throw invalid(`${attrTok.word} compares with a quoted string`);
      value = attr.caseExact ? valTok.str : valTok.str.toLowerCase();
      clauses.push((item) => {
        const v = attr.get(item);
        return typeof v === 'string' && (attr.caseExact ? v : v.toLowerCase()) === value;
      });
    }
    i += 3;
    if (i === tokens.length) break;
    if (tokens[i].word?.toLowerCase() !== 'and') throw invalid('only "and" can join comparisons');
    i += 1;
  }
  return clauses.length === 1 ? clauses[0] : (item) => clauses.every((c) => c(item));
}

const USER_FILTER_ATTRS = {
  id: { type: 'string', caseExact: true, get: (u) => u.sub },
  username: { type: 'string', caseExact: false, get: (u) => u.username },
  displayname: { type: 'string', caseExact: false, get: (u) => u.name ?? u.username },
  active: { type: 'boolean', get: (u) => u.active },
};
const GROUP_FILTER_ATTRS = {
  id: { type: 'string', caseExact: true, get: (g) => g.id },
  displayname: { type: 'string', caseExact: false, get: (g) => g.name },
};

const byId = (a, b) => {
  if (a.id < b.id) return -1;
  return a.id > b.id ? 1 : 0;
};

// Sorted views of the users and the groups derived from them.  Built on the
// first SCIM request after a change, O(n log n); requests then slice it.
function buildScimIndex(users) {
  const sortedUsers = [...users.values()].map((u) => ({ id: u.sub, user: u })).sort(byId).map((e) => e.user);
  const groups = new Map(); // name -> {id, name, members: Set(sub)}
  for (const u of sortedUsers) {
    for (const name of u.groups) {
      let g = groups.get(name);
      if (!g) {
        g = { id: scimGroupId(name), name, members: new Set() };
        groups.set(name, g);
      }
      g.members.add(u.sub);
    }
  }
  const sortedGroups = [...groups.values()].sort(byId);
  return {
    users: sortedUsers,
    groups: sortedGroups,
    groupById: new Map(sortedGroups.map((g) => [g.id, g])),
  };
}

function parsePaging(query) {
  const int = (name, fallback) => {
    const raw = query[name];
    if (raw === undefined || raw === '') return fallback;
    if (typeof raw !== 'string' || !/^-?\d{1,15}$/.test(raw)) {
      throw new ScimError(400, `${name} must be an integer`, 'invalidValue');
    }
    return Number(raw);
  };
  // RFC 7644 3.4.2.4: startIndex < 1 means 1, a negative count means 0.
  const startIndex = Math.max(1, int('startIndex', 1));
  const count = Math.min(SCIM_MAX_COUNT, Math.max(0, int('count', SCIM_DEFAULT_COUNT)));
  return { startIndex, count };
}

// ---------------------------------------------------------------- main

async function main() {
  const opt = parseOptions();

  if (opt.genKeys) {
    fs.writeFileSync(opt.genKeys, `${JSON.stringify({ keys: [generateSigningKey()] }, null, 2)}\n`, { mode: 0o600 });
    console.error(`vpnr-idp: wrote ${opt.genKeys}`);
    return;
  }

  const dataFile = path.resolve(opt.data);
  let state;
  try {
    state = readDataFile(dataFile);
  } catch (err) {
    fail(`cannot load data file ${dataFile}: ${err.message}`);
  }
  const signingKeys = opt.keys ? loadKeys(opt.keys) : [generateSigningKey()];

  const findUserByLogin = (login) => {
    for (const u of state.users.values()) {
      if (u.username === login || (u.email && u.email === login)) return u;
    }
    return undefined;
  };
  const activeUser = (sub) => {
    const u = state.users.get(sub);
    return u && u.active ? u : undefined;
  };
  const resourceInfo = (identifier) => state.resources.find((r) => r.identifier === identifier);

  // SCIM: sorted views, rebuilt lazily on the first request after a change.
  let scimIndex;
  const scimChanged = () => {
    scimIndex = undefined;
  };
  const getScimIndex = () => {
    if (!scimIndex || scimIndex.state !== state) scimIndex = { ...buildScimIndex(state.users), state };
    return scimIndex;
  };
  // Fault injection (test scaffolding, set through POST /admin/faults).
  const faults = { scim: 'none' };
  // SCIM bearer tokens are verified against our own (public) signing keys.
  const publicJwks = createLocalJWKSet({
    keys: signingKeys.map(({
      kty, n, e, kid, alg, use,
    }) => ({
      kty, n, e, kid, alg, use,
    })),
  });

  // The HTTP server is bound first so that --port 0 works: the issuer
  // (which embeds the port) is only known after listening.
  let handler = (req, res) => {
    res.statusCode = 503;
    res.end('starting\n');
  };
  const server = http.createServer((req, res) => handler(req, res));
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opt.port, opt.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port } = server.address();
  const hostForUrl = opt.host.includes(':') ? `[${opt.host}]` : opt.host;
  const issuer = opt.issuer ?? `http://${hostForUrl}:${port}`;
  const issuerPath = new URL(issuer).pathname.replace(/\/$/, '');

  const configuration = {
    adapter: makeAdapterClass(() => state),
    clients: [],
    jwks: { keys: signingKeys },
    cookies: {
      keys: [crypto.randomBytes(32).toString('base64url')],
    },
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
      address: ['address'],
    },
    scopes: ['openid', 'offline_access'],
    responseTypes: ['code'],
    // put scope-granted claims (groups, email...) into ID tokens as well
    conformIdTokenClaims: false,
    async findAccount(ctx, sub) {
      if (!activeUser(sub)) return undefined;
      return {
        accountId: sub,
        async claims() {
          const u = activeUser(sub);
          if (!u) return { sub };
          return {
            sub,
            preferred_username: u.username,
            name: u.name ?? u.username,
            email: u.email,
            email_verified: u.email ? true : undefined,
            groups: [...u.groups],
            address: u.address,
          };
        },
      };
    },
    // claims copied into every access token issued for a user (JWT access
    // tokens carry them; for opaque tokens they show up in introspection)
    async extraTokenClaims(ctx, token) {
      const u = token.accountId ? activeUser(token.accountId) : undefined;
      if (!u) return undefined;
      return { groups: [...u.groups], preferred_username: u.username, email: u.email };
    },
    interactions: {
      url: (ctx, interaction) => `${issuerPath}/interaction/${interaction.uid}`,
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => client.clientAuthMethod !== 'none' || token.clientId === client.clientId,
      },
      revocation: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
      },
      deviceFlow: {
        enabled: true,
        async userCodeInputSource(ctx, form, out, err) {
          let msg = '<p>Enter the code displayed on your device.</p>';
          if (err && (err.userCode || err.name === 'NoCodeError')) msg = '<p class="error">The code you entered is incorrect. Try again.</p>';
          else if (err && err.name === 'AbortedError') msg = '<p class="error">The sign-in request was aborted.</p>';
          else if (err) msg = '<p class="error">There was an error processing your request.</p>';
          ctx.type = 'html';
          ctx.body = page('Device sign-in', `${msg}\n${form}\n<button type="submit" form="op.deviceInputForm">Continue</button>`);
        },
        async userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
          ctx.type = 'html';
          ctx.body = page('Confirm device', `<p>Client: <strong>${esc(client.clientName ?? client.clientId)}</strong></p>
<p>Code: <code id="user-code">${esc(userCode)}</code></p>
${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>
<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
        },
        async successSource(ctx) {
          ctx.type = 'html';
          ctx.body = page('Sign-in Success', `<p id="result">Device sign-in for ${esc(ctx.oidc.client.clientName ?? ctx.oidc.client.clientId)} succeeded; you can close this page.</p>`);
        },
      },
      resourceIndicators: {
        enabled: true,
        // Requests that name no resource get the first configured one, so
        // client_credentials and non-openid requests yield JWT access
        // tokens.  Requests with the openid scope still get an opaque
        // userinfo token unless `resource` is sent to the token endpoint.
        async defaultResource(ctx, client, oneOf) {
          if (oneOf) return oneOf.includes(state.resources[0]?.identifier) ? state.resources[0].identifier : oneOf[0];
          return state.resources[0]?.identifier;
        },
        async useGrantedResource() {
          return false;
        },
        async getResourceServerInfo(ctx, identifier) {
          const r = resourceInfo(identifier);
          if (!r) throw new errors.InvalidTarget();
          return {
            scope: r.scope,
            audience: r.audience,
            accessTokenFormat: 'jwt',
            accessTokenTTL: r.accessTokenTTL ?? opt.accessTokenTTL,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          ctx.type = 'html';
          ctx.body = page('Sign out', `${form}
<button type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button>
<button type="submit" form="op.logoutForm">Stay signed in</button>`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.type = 'html';
          ctx.body = page('Signed out', '<p>You are signed out.</p>');
        },
      },
    },
    clientBasedCORS: () => false,
    ttl: {
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? opt.accessTokenTTL,
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? opt.accessTokenTTL,
      AuthorizationCode: 60,
      DeviceCode: 600,
      IdToken: 3600,
      Interaction: 3600,
      Grant: 14 * DAY,
      RefreshToken: 14 * DAY,
      Session: 14 * DAY,
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', Object.entries(out).map(([k, v]) => `<p><strong>${esc(k)}</strong>: <span class="${esc(k)}">${esc(v)}</span></p>`).join('\n'));
    },
  };

  let provider;
  try {
    provider = new Provider(issuer, configuration);
  } catch (err) {
    fail(`invalid provider configuration: ${err.message}`);
  }

  const validateClients = async (clients) => {
    for (const [id, metadata] of clients) {
      try {
        await provider.Client.validate(structuredClone(metadata));
      } catch (err) {
        throw new Error(`client ${id}: ${err.error_description ?? err.message}`);
      }
    }
  };
  try {
    await validateClients(state.clients);
  } catch (err) {
    fail(`invalid data file ${dataFile}: ${err.message}`);
  }

  // ------------------------------------------------------------ interaction

  const redirect303 = (ctx, url) => {
    ctx.redirect(url);
    ctx.status = 303;
  };

  const renderLogin = (ctx, details, error, status = 200) => {
    const client = state.clients.get(details.params.client_id);
    const action = `${issuerPath}/interaction/${details.uid}`;
    const hint = typeof details.params.login_hint === 'string' ? details.params.login_hint : '';
    ctx.status = status;
    ctx.type = 'html';
    ctx.body = page('Sign in', `<p>Sign in to continue to <strong>${esc(client?.client_name ?? details.params.client_id)}</strong>.</p>
${error ? `<p class="error">${esc(error)}</p>` : ''}
<form id="login" method="post" action="${esc(action)}/login">
<label>Username <input type="text" name="username" value="${esc(hint)}" autocomplete="username" autofocus></label>
<label>Password <input type="password" name="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button>
</form>
<form id="abort" method="post" action="${esc(action)}/abort"><button type="submit">Cancel</button></form>`);
  };

  const autoConsent = async (ctx, details) => {
    const { prompt: { details: missing }, params, session } = details;
    let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
    if (!grant) grant = new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, { consent: { grantId } });
    redirect303(ctx, returnTo);
  };

  const interactionRoute = async (ctx, uid, action) => {
    ctx.set('cache-control', 'no-store');
    let details;
    try {
      details = await provider.interactionDetails(ctx.req, ctx.res);
    } catch {
      details = undefined;
    }
    if (!details || details.uid !== uid) {
      ctx.status = 400;
      ctx.type = 'html';
      ctx.body = page('Error', '<p class="error">Unknown or expired sign-in request. Start again.</p>');
      return;
    }
    const promptName = details.prompt.name;

    if (!action && ctx.method === 'GET') {
      if (promptName === 'login') return renderLogin(ctx, details);
      if (promptName === 'consent') return autoConsent(ctx, details);
      ctx.throw(400, `unsupported prompt ${promptName}`);
    }
    if (ctx.method !== 'POST') ctx.throw(405);

    if (action === 'abort') {
      const returnTo = await provider.interactionResult(ctx.req, ctx.res, {
        error: 'access_denied', error_description: 'End-User aborted interaction',
      }, { mergeWithLastSubmission: false });
      return redirect303(ctx, returnTo);
    }
    if (action === 'login') {
      if (promptName !== 'login') ctx.throw(400, 'this request does not expect a login');
      const form = await readForm(ctx);
      const user = findUserByLogin(form.username ?? '');
      const ok = user !== undefined && safeEqual(form.password ?? '', user.password);
      if (!ok || !user.active) {
        return renderLogin(ctx, details, 'Invalid username or password, or the account is disabled.', 401);
      }
      const returnTo = await provider.interactionResult(ctx.req, ctx.res, {
        login: { accountId: user.sub, amr: ['pwd'] },
      }, { mergeWithLastSubmission: false });
      return redirect303(ctx, returnTo);
    }
    ctx.throw(404);
    return undefined;
  };

  // ------------------------------------------------------------ SCIM

  const scimBase = `${issuer.replace(/\/$/, '')}/scim/v2`;

  const scimSend = (ctx, status, doc) => {
    ctx.status = status;
    ctx.body = typeof doc === 'string' ? doc : JSON.stringify(doc);
    ctx.set('content-type', SCIM_CONTENT_TYPE);
  };

  const scimUser = (u) => {
    const doc = {
      schemas: [SCIM_USER_SCHEMA],
      id: u.sub,
      userName: u.username,
      displayName: u.name ?? u.username,
      active: u.active,
    };
    if (u.email) doc.emails = [{ value: u.email, primary: true }];
    doc.groups = [...new Set(u.groups)].map((name) => ({ value: scimGroupId(name), display: name }));
    if (u.ipAddresses.length > 0) {
      doc.schemas.push(SCIM_DEVICE_SCHEMA);
      doc[SCIM_DEVICE_SCHEMA] = { ipAddresses: [...u.ipAddresses] };
    }
    doc.meta = { resourceType: 'User', location: `${scimBase}/Users/${encodeURIComponent(u.sub)}` };
    return doc;
  };

  // Members are listed by sub order, inactive users included.  The rendered
  // list is kept on the index entry (the index is dropped on every change).
  const scimGroup = (g) => {
    g.rendered ??= [...g.members].map((sub) => ({
      value: sub, display: state.users.get(sub)?.username, type: 'User',
    }));
    return {
      schemas: [SCIM_GROUP_SCHEMA],
      id: g.id,
      displayName: g.name,
      members: g.rendered,
      meta: { resourceType: 'Group', location: `${scimBase}/Groups/${encodeURIComponent(g.id)}` },
    };
  };

  const authError = (status, error, detail) => {
    const err = new ScimError(status, `${error}: ${detail}`);
    err.wwwAuthenticate = status === 403
      ? `Bearer error="${error}", scope="${SCIM_READ_SCOPE}"`
      : `Bearer error="${error}"`;
    return err;
  };

  // An RS256 JWT access token of this provider (RFC 9068) for the resource
  // that grants scim:read, carrying that scope.
  const scimAuthenticate = async (ctx) => {
    const m = /^Bearer\s+(\S+)$/i.exec(ctx.get('authorization'));
    if (!m) throw authError(401, 'invalid_token', 'a bearer token is required');
    const resource = state.resources.find((r) => r.scope.split(' ').includes(SCIM_READ_SCOPE)) ?? state.resources[0];
    if (!resource) throw authError(401, 'invalid_token', 'no resource is configured');
    let payload;
    try {
      ({ payload } = await jwtVerify(m[1], publicJwks, {
        issuer,
        audience: [...new Set([resource.identifier, resource.audience])],
        algorithms: ['RS256'],
        typ: 'at+jwt',
        requiredClaims: ['exp'],
      }));
    } catch (err) {
      throw authError(401, 'invalid_token', err.message);
    }
    const scopes = typeof payload.scope === 'string' ? payload.scope.split(' ') : [];
    if (!scopes.includes(SCIM_READ_SCOPE)) {
      throw authError(403, 'insufficient_scope', `the token lacks the ${SCIM_READ_SCOPE} scope`);
    }
  };

  const decodeSegment = (raw) => {
    try {
      return decodeURIComponent(raw);
    } catch {
      return undefined;
    }
  };

  const scimList = (ctx, kind) => {
    const { startIndex, count } = parsePaging(ctx.query);
    const index = getScimIndex();
    let items = kind === 'Users' ? index.users : index.groups;
    const { filter } = ctx.query;
    if (filter !== undefined) {
      if (typeof filter !== 'string') throw new ScimError(400, 'filter given more than once', 'invalidFilter');
      items = items.filter(parseScimFilter(filter, kind === 'Users' ? USER_FILTER_ATTRS : GROUP_FILTER_ATTRS));
    }
    let totalResults = items.length;
    let page = items.slice(startIndex - 1, startIndex - 1 + count);
    if (faults.scim === 'truncate') {
      // Claims one more resource than exists and serves nothing past page 1.
      totalResults += 1;
      if (startIndex > 1) page = [];
    }
    const render = kind === 'Users' ? scimUser : scimGroup;
    return {
      schemas: [SCIM_LIST_SCHEMA],
      totalResults,
      startIndex,
      itemsPerPage: page.length,
      Resources: page.map(render),
    };
  };

  const scimRoute = async (ctx, rest) => {
    ctx.set('cache-control', 'no-store');
    try {
      if (faults.scim === 'slow') await new Promise((resolve) => { setTimeout(resolve, SCIM_SLOW_MS); });
      await scimAuthenticate(ctx);
      if (faults.scim === 'http500') throw new ScimError(500, 'injected fault: http500');
      if (ctx.method !== 'GET') throw new ScimError(501, 'this SCIM service is read-only');
      if (faults.scim === 'garbage') {
        scimSend(ctx, 200, '<html><body>{"schemas": ["urn:ietf:params:scim:api:messages:2.0:ListR');
        return;
      }
      if (rest === '/Users' || rest === '/Groups') {
        scimSend(ctx, 200, scimList(ctx, rest.slice(1)));
        return;
      }
      const m = /^\/(Users|Groups)\/([^/]+)$/.exec(rest);
      const id = m ? decodeSegment(m[2]) : undefined;
      if (m && m[1] === 'Users') {
        const u = id === undefined ? undefined : state.users.get(id);
        if (!u) throw new ScimError(404, `no user with id ${id ?? m[2]}`);
        scimSend(ctx, 200, scimUser(u));
        return;
      }
      if (m && m[1] === 'Groups') {
        const g = id === undefined ? undefined : getScimIndex().groupById.get(id);
        if (!g) throw new ScimError(404, `no group with id ${id ?? m[2]}`);
        scimSend(ctx, 200, scimGroup(g));
        return;
      }
      throw new ScimError(404, `no SCIM endpoint ${rest || '/'}`);
    } catch (err) {
      if (!(err instanceof ScimError)) throw err;
      if (err.wwwAuthenticate) ctx.set('www-authenticate', err.wwwAuthenticate);
      scimSend(ctx, err.status, {
        schemas: [SCIM_ERROR_SCHEMA],
        status: String(err.status),
        ...(err.scimType ? { scimType: err.scimType } : {}),
        detail: err.message,
      });
    }
  };

  // ------------------------------------------------------------ admin API

  const adminRoute = async (ctx, rest) => {
    ctx.set('cache-control', 'no-store');
    if (!opt.adminToken) {
      ctx.status = 404;
      ctx.body = { error: 'admin API disabled (no --admin-token)' };
      return;
    }
    const m = /^Bearer\s+(\S+)$/i.exec(ctx.get('authorization'));
    if (!m || !safeEqual(m[1], opt.adminToken)) {
      ctx.status = 401;
      ctx.set('www-authenticate', 'Bearer realm="vpnr-idp-admin"');
      ctx.body = { error: 'unauthorized' };
      return;
    }
    const route = `${ctx.method} ${rest}`;
    let match;
    if (route === 'GET /users') {
      ctx.body = { users: [...state.users.values()].map(publicUser) };
      return;
    }
    if (route === 'POST /users') {
      const body = await readJson(ctx);
      let user;
      try {
        user = normalizeUser(body, 'user');
      } catch (err) {
        ctx.status = 400;
        ctx.body = { error: err.message };
        return;
      }
      const clash = state.users.has(user.sub) ? `sub ${user.sub}`
        : [...state.users.values()].some((u) => u.username === user.username) && `username ${user.username}`;
      if (clash) {
        ctx.status = 409;
        ctx.body = { error: `a user with ${clash} exists` };
        return;
      }
      state.users.set(user.sub, user);
      scimChanged();
      ctx.status = 201;
      ctx.body = publicUser(user);
      return;
    }
    if (route === 'GET /faults') {
      ctx.body = { ...faults };
      return;
    }
    if (route === 'POST /faults') {
      const body = await readJson(ctx);
      if (!SCIM_FAULTS.has(body?.scim)) {
        ctx.status = 400;
        ctx.body = { error: `scim must be one of ${[...SCIM_FAULTS].join(', ')}` };
        return;
      }
      faults.scim = body.scim;
      ctx.body = { ...faults };
      return;
    }
    if (route === 'POST /reload') {
      try {
        const next = readDataFile(dataFile);
        await validateClients(next.clients);
        state = next;
        scimChanged();
      } catch (err) {
        ctx.status = 400;
        ctx.body = { error: 'reload_failed', error_description: err.message };
        return;
      }
      ctx.body = { reloaded: true, users: state.users.size, clients: state.clients.size };
      return;
    }
    if ((match = /^(GET|PUT|POST|DELETE) \/users\/([^/]+)(\/groups|\/ip_addresses|\/disable|\/enable)?$/.exec(route))) {
      const [, method, rawSub, op] = match;
      const sub = decodeSegment(rawSub);
      const user = sub === undefined ? undefined : state.users.get(sub);
      if (!user) {
        ctx.status = 404;
        ctx.body = { error: 'no such user' };
        return;
      }
      if (method === 'GET' && !op) {
        ctx.body = publicUser(user);
        return;
      }
      if ((method === 'PUT' || method === 'POST') && op === '/groups') {
        const body = await readJson(ctx);
        try {
          user.groups = asStringList(body?.groups, 'groups');
        } catch (err) {
          ctx.status = 400;
          ctx.body = { error: err.message };
          return;
        }
        scimChanged();
        ctx.body = publicUser(user);
        return;
      }
      if ((method === 'PUT' || method === 'POST') && op === '/ip_addresses') {
        const body = await readJson(ctx);
        try {
          if (!Array.isArray(body?.ip_addresses)) throw new Error('body must be {"ip_addresses": [...]}');
          user.ipAddresses = asNonEmptyStringList(body.ip_addresses, 'ip_addresses');
        } catch (err) {
          ctx.status = 400;
          ctx.body = { error: err.message };
          return;
        }
        scimChanged();
        ctx.body = publicUser(user);
        return;
      }
      if (method === 'POST' && (op === '/disable' || op === '/enable')) {
        user.active = op === '/enable';
        scimChanged();
        ctx.body = publicUser(user);
        return;
      }
      if (method === 'DELETE' && !op) {
        state.users.delete(user.sub);
        scimChanged();
        ctx.body = { deleted: user.sub };
        return;
      }
    }
    ctx.status = 404;
    ctx.body = { error: 'not found' };
  };

  provider.use(async (ctx, next) => {
    const rel = issuerPath && ctx.path.startsWith(issuerPath) ? ctx.path.slice(issuerPath.length) : ctx.path;
    if (rel === '/admin' || rel.startsWith('/admin/')) return adminRoute(ctx, rel.slice('/admin'.length));
    if (rel === '/scim/v2' || rel.startsWith('/scim/v2/')) return scimRoute(ctx, rel.slice('/scim/v2'.length));
    const im = /^\/interaction\/([\w-]+)(?:\/(login|abort))?$/.exec(rel);
    if (im) return interactionRoute(ctx, im[1], im[2]);
    return next();
  });

  provider.on('server_error', (ctx, err) => console.error('vpnr-idp: server_error', err));

  handler = provider.callback();

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    console.error(`vpnr-idp: ${signal}, shutting down`);
    const force = setTimeout(() => process.exit(0), 3000);
    force.unref();
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));

  process.stdout.write(`${JSON.stringify({
    ready: true, issuer, host: opt.host, port, pid: process.pid,
  })}\n`);
}

main().catch((err) => {
  console.error('vpnr-idp: fatal:', err);
  process.exit(1);
});
