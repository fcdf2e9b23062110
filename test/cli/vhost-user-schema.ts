// The types of QEMU's docs/interop/vhost-user.json that a back-end's
// --print-capabilities output and a /usr/share/qemu/vhost-user descriptor
// must conform to, transcribed as data, with a small checker of the QAPI rules
// that apply: enums take only their values, structs only their members
// (optional ones marked '*'), arrays hold their element type.
//
// VHostUserBackendCapabilities is a union on 'type'. The 2019 schema lists
// branches for input and gpu only; block back-ends (QEMU's own
// contrib/vhost-user-blk) print VHostUserBackendCapabilitiesBlock's members,
// which the schema defines since 5.0 for exactly that, so the block branch is
// included here. Every other type carries the base member alone.

type TypeRef = string | [string];

interface Enum { enum: readonly string[] }
interface Struct { struct: Record<string, TypeRef> }
type Def = Enum | Struct;

export const SCHEMA: Record<string, Def> = {
  VHostUserBackendType: {
    enum: ['9p', 'balloon', 'block', 'caif', 'console', 'crypto', 'gpu', 'input', 'net', 'rng', 'rpmsg', 'rproc-serial', 'scsi', 'vsock', 'fs'],
  },
  VHostUserBackendBlockFeature: { enum: ['read-only', 'blk-file'] },
  VHostUserBackendCapabilitiesBlock: { struct: { features: ['VHostUserBackendBlockFeature'] } },
  VHostUserBackendInputFeature: { enum: ['evdev-path', 'no-grab'] },
  VHostUserBackendCapabilitiesInput: { struct: { features: ['VHostUserBackendInputFeature'] } },
  VHostUserBackendGPUFeature: { enum: ['render-node', 'virgl'] },
  VHostUserBackendCapabilitiesGPU: { struct: { features: ['VHostUserBackendGPUFeature'] } },
  VhostUserBackend: { struct: { description: 'str', type: 'VHostUserBackendType', binary: 'str', '*tags': ['str'] } },
};

const UNION_BRANCHES: Record<string, string> = {
  block: 'VHostUserBackendCapabilitiesBlock',
  input: 'VHostUserBackendCapabilitiesInput',
  gpu: 'VHostUserBackendCapabilitiesGPU',
};

/** Problems found checking value against type (empty: it conforms). */
export function check(value: unknown, type: TypeRef, at = '$'): string[] {
  if (Array.isArray(type)) {
    if (!Array.isArray(value)) return [`${at}: expected an array of ${type[0]}`];
    return value.flatMap((v, i) => check(v, type[0], `${at}[${i}]`));
  }
  if (type === 'str') return typeof value === 'string' ? [] : [`${at}: expected a string`];
  if (type === 'VHostUserBackendCapabilities') return checkCapabilities(value, at);
  const def = SCHEMA[type];
  if (!def) throw new Error(`unknown type ${type}`);
  if ('enum' in def) return typeof value === 'string' && def.enum.includes(value) ? [] : [`${at}: ${JSON.stringify(value)} is not a ${type}`];
  return checkMembers(value, def.struct, at);
}

function checkMembers(value: unknown, members: Record<string, TypeRef>, at: string): string[] {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return [`${at}: expected an object`];
  const obj = value as Record<string, unknown>;
  const problems: string[] = [];
  const known = new Set<string>();
  for (const [key, t] of Object.entries(members)) {
    const name = key.replace(/^\*/, '');
    known.add(name);
    if (!(name in obj)) {
      if (!key.startsWith('*')) problems.push(`${at}: missing member '${name}'`);
      continue;
    }
    problems.push(...check(obj[name], t, `${at}.${name}`));
  }
  for (const k of Object.keys(obj)) if (!known.has(k)) problems.push(`${at}: unexpected member '${k}'`);
  return problems;
}

function checkCapabilities(value: unknown, at: string): string[] {
  const base: Record<string, TypeRef> = { type: 'VHostUserBackendType' };
  if (typeof value !== 'object' || value === null) return [`${at}: expected an object`];
  const t = (value as Record<string, unknown>).type;
  const branch = typeof t === 'string' ? UNION_BRANCHES[t] : undefined;
  const members = branch ? { ...base, ...(SCHEMA[branch] as Struct).struct } : base;
  return checkMembers(value, members, at);
}
