// Validates Istio and Envoy Gateway custom resources against their published CRD schemas,
// as shipped by the npm packages pinned in package.json (@kubernetes-models/istio: Istio's
// crd-all.gen.yaml; @kubernetes-models/envoy-gateway: Envoy Gateway's api/v1alpha1 types),
// and rejects unknown fields the way `kubectl apply` (strict field validation) does.
//
// Input (stdin): a JSON array of documents. Output (stdout): one JSON line per document,
// {"index", "kind", "name", "errors": [...]}; exit status 1 when any document has errors.
//
// Unknown fields: the packages' compiled validators, like the CRD schemas, do not forbid
// unknown properties (the API server prunes or, with strict validation, rejects them). So
// each object of the document is wrapped in a Proxy that records which properties the
// validator looks up. A schema object with declared properties looks each of them up; a map
// (additionalProperties) enumerates its keys; a free-form object
// (x-kubernetes-preserve-unknown-fields, e.g. WasmPlugin.spec.pluginConfig) is not looked
// into at all. A key of a looked-up, not enumerated object that the validator never asked
// for is a field the schema does not have.

const MODELS = {
  "extensions.istio.io/v1alpha1": "@kubernetes-models/istio/extensions.istio.io/v1alpha1",
  "networking.istio.io/v1": "@kubernetes-models/istio/networking.istio.io/v1",
  "networking.istio.io/v1beta1": "@kubernetes-models/istio/networking.istio.io/v1beta1",
  "networking.istio.io/v1alpha3": "@kubernetes-models/istio/networking.istio.io/v1alpha3",
  "security.istio.io/v1": "@kubernetes-models/istio/security.istio.io/v1",
  "gateway.envoyproxy.io/v1alpha1": "@kubernetes-models/envoy-gateway/gateway.envoyproxy.io/v1alpha1",
};

const TOP_LEVEL = new Set(["apiVersion", "kind", "metadata", "spec"]);

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

// A deep copy of `value` whose objects record the lookups in `seen` (object -> record).
function traced(value, seen) {
  if (Array.isArray(value)) {
    return value.map((item) => traced(item, seen));
  }
  if (!isObject(value)) {
    return value;
  }
  const target = {};
  for (const [key, item] of Object.entries(value)) {
    target[key] = traced(item, seen);
  }
  const record = { asked: new Set(), enumerated: false };
  seen.set(value, record);
  return new Proxy(target, {
    get(t, key, receiver) {
      if (typeof key === "string") record.asked.add(key);
      return Reflect.get(t, key, receiver);
    },
    has(t, key) {
      if (typeof key === "string") record.asked.add(key);
      return Reflect.has(t, key);
    },
    getOwnPropertyDescriptor(t, key) {
      if (typeof key === "string") record.asked.add(key);
      return Reflect.getOwnPropertyDescriptor(t, key);
    },
    ownKeys(t) {
      record.enumerated = true;
      return Reflect.ownKeys(t);
    },
  });
}

function unknownFields(value, seen, path, out) {
  if (Array.isArray(value)) {
    value.forEach((item, i) => unknownFields(item, seen, `${path}[${i}]`, out));
    return;
  }
  if (!isObject(value)) {
    return;
  }
  const record = seen.get(value);
  if (record.asked.size === 0 && !record.enumerated) {
    return; // free-form: the schema does not describe its content
  }
  for (const [key, item] of Object.entries(value)) {
    if (!record.enumerated && !record.asked.has(key)) {
      out.push(`${path}.${key}: unknown field`);
      continue;
    }
    unknownFields(item, seen, `${path}.${key}`, out);
  }
}

async function check(doc) {
  const errors = [];
  const module = MODELS[doc.apiVersion];
  if (!module) {
    return [`apiVersion ${doc.apiVersion}: no published schema known to this validator`];
  }
  const models = await import(module);
  const Model = models[doc.kind];
  if (!Model) {
    return [`${doc.apiVersion} has no kind ${doc.kind}`];
  }
  for (const key of Object.keys(doc)) {
    if (!TOP_LEVEL.has(key)) errors.push(`.${key}: unknown top-level field`);
  }
  const seen = new Map();
  // The model's constructor deep-copies what it is given (reading every key), so the traced
  // objects are set on the instance afterwards.
  const model = new Model({});
  for (const key of ["metadata", "spec"]) {
    if (key in doc) model[key] = traced(doc[key], seen);
  }
  try {
    model.validate();
  } catch (e) {
    errors.push(String(e.message));
  }
  for (const key of ["metadata", "spec"]) {
    if (key in doc) unknownFields(doc[key], seen, `.${key}`, errors);
  }
  return errors;
}

let input = "";
for await (const chunk of process.stdin) input += chunk;
const docs = JSON.parse(input);
let failed = false;
for (const [index, doc] of docs.entries()) {
  const errors = await check(doc);
  failed ||= errors.length > 0;
  console.log(JSON.stringify({ index, kind: doc.kind, name: doc?.metadata?.name ?? null, errors }));
}
process.exit(failed ? 1 : 0);
