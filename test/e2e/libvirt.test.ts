// libvirt drives QEMU with a vhost-user disk and NIC served by vhostd: the
// domain is built from the XML block the README shows (so the README stays
// true), libvirt validates and starts it under TCG, and the guest must see
// the disk (reading what the host wrote, writing what the host then reads)
// and the NIC (its MAC, and a ping to the tap on the host side).
//
// libvirtd runs in session mode as an unprivileged user with its own
// directories: nothing of the host's libvirt configuration or state is used
// or changed, and no system daemon is needed (systemd is not PID 1 here).
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, appendFileSync, truncateSync, openSync, writeSync, readSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startVhostd, startVhostdNet, DAEMON, type Backend } from './daemons.js';
import { buildOverlay, hasCommand, provisionGuestKit, qemuAvailable } from './guest.js';
import { Netns } from './netns.js';

const NOBODY = 65534;
const IMAGE_BYTES = 64 << 20;
const MAC = '52:54:00:4e:a7:01';
const GUEST_TIMEOUT_MS = Number(process.env.VHOSTD_GUEST_TIMEOUT ?? 300_000);
const HOST_PATTERN = 'written-by-the-host-before-boot';
const GUEST_PATTERN = 'written-by-the-libvirt-guest';

const run = (qemuAvailable() && hasCommand('virsh')) || process.env.CI === 'true' ? describe : describe.skip;

/** The README's libvirt block: what goes in <domain> and what goes in <devices>. */
export function readmeLibvirtXml(): { domain: string; devices: string } {
  const text = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  const m = /<!-- vhostd-libvirt: in <domain> -->\n([\s\S]*?)<!-- vhostd-libvirt: in <devices> -->\n([\s\S]*?)<!-- vhostd-libvirt: end -->/.exec(text);
  if (!m) throw new Error('README.md lost its libvirt XML block (the vhostd-libvirt markers)');
  return { domain: m[1]!, devices: m[2]! };
}

run('a libvirt domain served by vhostd', { timeout: GUEST_TIMEOUT_MS + 120_000 }, () => {
  let dir: string;
  let home: string;
  let ns: Netns;
  let blk: Backend | undefined;
  let net: Backend | undefined;
  const env = (): Record<string, string> => ({
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    HOME: home,
    XDG_CONFIG_HOME: join(home, '.config'),
    XDG_CACHE_HOME: join(home, '.cache'),
    XDG_DATA_HOME: join(home, '.local/share'),
    XDG_RUNTIME_DIR: join(home, 'run'),
  });
  /** virsh against the session daemon of the unprivileged user (started on first use). */
  const virsh = (...args: string[]): { status: number | null; out: string } => {
    const r = spawnSync('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', 'virsh', '-c', 'qemu:///session', ...args], {
      env: env(),
      encoding: 'utf8',
      timeout: 120_000,
    });
    return { status: r.status, out: `${r.stdout}${r.stderr}` };
  };

  beforeAll(async () => {
    if (!hasCommand('virsh') || !hasCommand('xmllint', ['--version'])) execFileSync('bash', [new URL('../guest/provision.sh', import.meta.url).pathname], { stdio: 'inherit' });
    dir = mkdtempSync('/tmp/vhostd-libvirt-');
    chmodSync(dir, 0o755);
    home = join(dir, 'home');
    for (const d of [home, join(home, 'run')]) {
      mkdirSync(d, { recursive: true, mode: 0o700 });
      chownSync(d, NOBODY, NOBODY);
    }
    ns = new Netns('lv');
    ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
  });

  afterAll(async () => {
    virsh('destroy', `vhostd-e2e-${process.pid}`);
    // The session daemon would linger until its idle timeout.
    const pidFile = join(home, 'run', 'libvirt', 'libvirtd.pid');
    if (existsSync(pidFile)) {
      try {
        process.kill(Number(readFileSync(pidFile, 'utf8').trim()), 'SIGTERM');
      } catch {
        // already gone
      }
    }
    await blk?.stop();
    await net?.stop();
    ns?.destroy();
    rmSync(dir, { recursive: true, force: true });
  });

  it('the guest sees the disk and the NIC, and vhostd counts its I/O', async () => {
    const kit = await provisionGuestKit();
    const image = join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, IMAGE_BYTES);
    const fd = openSync(image, 'r+');
    writeSync(fd, Buffer.from(HOST_PATTERN), 0, HOST_PATTERN.length, 1 << 20);
    closeSync(fd);
    const diskSock = join(dir, 'vm1-disk.sock');
    const netSock = join(dir, 'vm1-net.sock');
    blk = await startVhostd(['--file', image, '--num-queues', '2'], diskSock);
    net = await startVhostdNet(ns.name, ['--tap', 'vlv0'], netSock);
    ns.ip('addr add 10.77.0.1/24 dev vlv0');
    // QEMU runs as the unprivileged user: let it connect (the systemd units do this with a group).
    for (const s of [diskSock, netSock]) chmodSync(s, 0o666);

    const initrd = join(dir, 'initrd');
    copyFileSync(kit.initramfs, initrd);
    appendFileSync(
      initrd,
      buildOverlay(
        `
echo "@@DISK_SECTORS=$(cat /sys/block/vda/size)"
echo "@@HOST_PATTERN=$(dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c ${HOST_PATTERN.length})"
printf '${GUEST_PATTERN}' | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null || exit 3
echo "@@MAC=$(cat /sys/class/net/eth0/address)"
ip link set eth0 up || exit 4
ip addr add 10.77.0.2/24 dev eth0 || exit 5
for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 10.77.0.1 >/dev/null 2>&1 && break; done
ping -c 3 -W 2 10.77.0.1 >/dev/null; echo "@@PING=$?"
exit 0
`,
        {},
      ),
    );
    chmodSync(initrd, 0o644);

    const console = join(home, 'console.log');
    const { domain, devices } = readmeLibvirtXml();
    const devXml = devices
      .replace('/run/vhostd/vm1-disk.sock', diskSock)
      .replace('/run/vhostd/vm1-net.sock', netSock)
      .replace("<model type='virtio'/>", "<model type='virtio'/>\n  <alias name='ua-nic0'/>");
    const xml = `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vhostd-e2e-${process.pid}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
${domain}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${kit.kernel}</kernel>
    <initrd>${initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet vhostd.watchdog=${Math.ceil(GUEST_TIMEOUT_MS / 1000) + 30}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
${devXml}
    <serial type='file'><source path='${console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='ua-nic0'><qemu:frontend>
      <qemu:property name='vectors' type='unsigned' value='0'/>
    </qemu:frontend></qemu:device>
  </qemu:override>
</domain>
`;
    const xmlPath = join(dir, 'domain.xml');
    writeFileSync(xmlPath, xml);
    chmodSync(xmlPath, 0o644);
    const valid = spawnSync('virt-xml-validate', [xmlPath, 'domain'], { encoding: 'utf8' });
    expect(`${valid.stdout}${valid.stderr}`, 'virt-xml-validate').toMatch(/validates/);
    expect(valid.status).toBe(0);

    const started = virsh('create', xmlPath);
    expect(started.status, started.out).toBe(0);
    const markers: Record<string, string> = {};
    const deadline = Date.now() + GUEST_TIMEOUT_MS;
    for (;;) {
      const text = existsSync(console) ? readFileSync(console, 'utf8') : '';
      for (const m of text.matchAll(/@@([A-Za-z0-9_.-]+)=(.*?)\r?$/gm)) markers[m[1]!] = m[2]!;
      if (markers.EXIT !== undefined) break;
      if (Date.now() > deadline) throw new Error(`the guest did not finish within ${GUEST_TIMEOUT_MS} ms:\n${text.slice(-4000)}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    expect(markers.EXIT, JSON.stringify(markers)).toBe('0');
    expect(Number(markers.DISK_SECTORS)).toBe(IMAGE_BYTES / 512);
    expect(markers.HOST_PATTERN).toBe(HOST_PATTERN);
    expect(markers.MAC).toBe(MAC);
    expect(markers.PING).toBe('0');
    const back = Buffer.alloc(GUEST_PATTERN.length);
    const rfd = openSync(image, 'r');
    readSync(rfd, back, 0, back.length, 4096 * 512);
    closeSync(rfd);
    expect(back.toString()).toBe(GUEST_PATTERN);

    // The disk's requests show in vhostd's counters.
    const stats = JSON.parse(execFileSync(process.execPath, [DAEMON, 'stats', '--socket', diskSock, '--json'], { encoding: 'utf8' })) as {
      queues: { device: Record<string, number> }[];
    };
    const reads = stats.queues.reduce((n, q) => n + q.device.reads!, 0);
    const writes = stats.queues.reduce((n, q) => n + q.device.writes!, 0);
    expect(reads).toBeGreaterThan(0);
    expect(writes).toBeGreaterThan(0);
  });
});
