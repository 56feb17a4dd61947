// The API page (`GET /docs`): this server's /openapi.json as text, every path with its method, summary and
// description, parameters, request body and responses, then the schemas they name.
// Written here, not Swagger UI: FastAPI's loads it from a CDN and it needs inline styles; offline and this CSP allow neither.
import { el } from "./common.js";

const $ = (id) => document.getElementById(id);
const METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

// Text with `code` spans, as the descriptions are written; paragraphs on blank lines.
function prose(text, tag = "p") {
  return String(text || "").split(/\n\s*\n/).filter((part) => part.trim()).map((part) =>
    el(tag, { class: "prose" }, ...part.split("`").map((piece, i) => (i % 2 ? el("code", { text: piece }) : piece))));
}

function refName(ref) {
  return ref.split("/").pop();
}

function schemaLink(ref) {
  const name = refName(ref);
  return el("a", { href: `#schema-${name}`, text: name });
}

// A schema as a short type expression: links for $ref, "a | b" for unions, "array of X", enums and constants.
function typeOf(schema) {
  if (!schema || typeof schema !== "object") return ["any"];
  if (schema.$ref) return [schemaLink(schema.$ref)];
  const union = schema.oneOf || schema.anyOf;
  if (union) {
    const members = union.filter((s) => s.type !== "null");
    const out = [];
    members.forEach((member, i) => out.push(...(i ? [" | "] : []), ...typeOf(member)));
    if (members.length < union.length) out.push(" or null");
    return out;
  }
  if (schema.allOf) return schema.allOf.flatMap((part, i) => [...(i ? [" & "] : []), ...typeOf(part)]);
  if (schema.const !== undefined) return [el("code", { text: JSON.stringify(schema.const) })];
  if (schema.enum) {
    const out = ["one of "];
    schema.enum.forEach((value, i) => out.push(...(i ? [", "] : []), el("code", { text: JSON.stringify(value) })));
    return out;
  }
  if (schema.type === "array") return ["array of ", ...typeOf(schema.items)];
  if (schema.type === "object" && schema.additionalProperties && typeof schema.additionalProperties === "object") {
    return ["object of ", ...typeOf(schema.additionalProperties)];
  }
  const type = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "any";
  return [schema.format ? `${type} (${schema.format})` : type];
}

// Ranges and limits of a schema and of its union members: "2 to 32000 characters", "10 to 50", "1 to 100 items".
function limitsOf(schema) {
  const parts = [];
  for (const s of [schema, ...(schema?.anyOf || []), ...(schema?.oneOf || [])]) {
    if (!s || typeof s !== "object") continue;
    const range = (lo, hi, unit) => {
      if (lo === undefined && hi === undefined) return;
      const text = lo !== undefined && hi !== undefined ? `${lo} to ${hi}` : lo !== undefined ? `at least ${lo}` : `at most ${hi}`;
      parts.push(unit ? `${text} ${unit}` : text);
    };
    range(s.minimum ?? s.exclusiveMinimum, s.maximum ?? s.exclusiveMaximum, "");
    range(s.minLength, s.maxLength, "characters");
    range(s.minItems, s.maxItems, "items");
  }
  return parts;
}

function details(schema) {
  const out = [];
  const limits = limitsOf(schema);
  if (limits.length) out.push(limits.join("; "));
  if (schema?.default !== undefined && schema.default !== null) out.push(`default ${JSON.stringify(schema.default)}`);
  return out.join(" · ");
}

function table(head, rows) {
  return el("div", { class: "table-scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((cell, i) =>
      el("td", { "data-label": head[i] }, ...[cell].flat())))))));
}

function contentRows(content) {
  return Object.entries(content || {}).map(([type, media]) => [el("code", { text: type }), typeOf(media.schema)]);
}

function operation(path, method, op) {
  const id = `op-${method}-${path.replace(/[^A-Za-z0-9]+/g, "-")}`;
  const section = el("section", { class: "panel op", id, "aria-labelledby": `${id}-title` },
    el("h2", { id: `${id}-title` }, el("span", { class: `method ${method}`, text: method.toUpperCase() }), " ",
      el("code", { class: "path", text: path }), op.summary ? el("span", { class: "summary", text: op.summary }) : null),
    ...prose(op.description));

  const params = op.parameters || [];
  if (params.length) {
    section.append(el("h3", { text: "Parameters" }), table(["Name", "In", "Type", "Required", "Description"],
      params.map((p) => [el("code", { text: p.name }), p.in, typeOf(p.schema), p.required ? "yes" : "no",
        [p.description || "", details(p.schema || {})].filter(Boolean).join(" · ")])));
  }

  const body = op.requestBody;
  if (body) {
    section.append(el("h3", { text: `Request body${body.required ? " (required)" : ""}` }), ...prose(body.description));
    section.append(table(["Content type", "Schema"], contentRows(body.content)));
    for (const media of Object.values(body.content || {})) {
      const schema = media.schema || {};
      const limits = limitsOf(schema);
      if (limits.length) section.append(el("p", { class: "muted small", text: `The array: ${limits.join("; ")}.` }));
      const example = media.example ?? Object.values(media.examples || {})[0]?.value;
      if (example !== undefined) {
        section.append(el("h4", { text: "Example" }), el("pre", { class: "example", text: JSON.stringify(example, null, 2) }));
      }
    }
  }

  const responses = Object.entries(op.responses || {});
  if (responses.length) {
    section.append(el("h3", { text: "Responses" }), table(["Status", "Description", "Content"],
      responses.map(([status, r]) => [el("code", { text: status }), prose(r.description, "span"),
        contentRows(r.content).flatMap(([type, schema], i) => [...(i ? [el("br")] : []), type, ": ", ...schema])])));
  }
  return { id, section };
}

function schemaSection(name, schema) {
  const required = new Set(schema.required || []);
  const section = el("section", { class: "panel schema", id: `schema-${name}` },
    el("h3", {}, el("code", { text: name }), el("span", { class: "muted small", text: ` ${schema.type || ""}` })),
    ...prose(schema.description));
  const props = Object.entries(schema.properties || {});
  if (props.length) {
    section.append(table(["Field", "Type", "Limits, default", "Description"], props.map(([prop, s]) => [
      [el("code", { text: prop }), required.has(prop) ? el("span", { class: "required", text: " required" }) : ""],
      typeOf(s), details(s), prose(s.description, "span")])));
  } else if (!schema.description) {
    section.append(el("p", { class: "muted", text: typeOf(schema).map((n) => (typeof n === "string" ? n : n.textContent)).join("") }));
  }
  return section;
}

async function start() {
  let spec;
  try {
    const response = await fetch("/openapi.json", { cache: "no-store" });
    // integers past 2^53 (the seed's maximum) as written, where the browser gives the reviver the source text
    spec = JSON.parse(await response.text(), (key, value, context) => (typeof value === "number"
      && !Number.isSafeInteger(value) && context?.source ? context.source : value));
  } catch (error) {
    $("api-error").textContent = `Could not read /openapi.json: ${error.message || error}`;
    return;
  }
  document.title = `${spec.info?.title || "k5serve"} API`;
  $("version").textContent = [spec.info?.version && `version ${spec.info.version}`, spec.openapi && `OpenAPI ${spec.openapi}`]
    .filter(Boolean).join(" · ");
  $("api-intro").replaceWith(...prose(spec.info?.description), el("p", { class: "muted" },
    "Each path below with its method, parameters, request body and responses, then the schemas they name. "
    + "The machine-readable document is ", el("a", { href: "/openapi.json", text: "/openapi.json" }), "."));

  const toc = [];
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      if (!item[method]) continue;
      const { id, section } = operation(path, method, item[method]);
      $("api-paths").append(section);
      toc.push(el("li", {}, el("a", { href: `#${id}` }, el("span", { class: `method ${method}`, text: method.toUpperCase() }),
        " ", el("code", { text: path })), item[method].summary ? ` ${item[method].summary}` : ""));
    }
  }
  $("api-toc").append(el("h2", { text: "Endpoints" }), el("ul", {}, ...toc));

  const schemas = Object.entries(spec.components?.schemas || {});
  $("schemas-title").hidden = schemas.length === 0;
  for (const [name, schema] of schemas) $("api-schemas").append(schemaSection(name, schema));
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

start();
