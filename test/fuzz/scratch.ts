import { ftruncateSync, openSync } from 'node:fs';
import { native, EFD_NONBLOCK, EFD_CLOEXEC } from '../../src/native/index.js';
import { FuzzDaemon } from './daemon.js';
import { FrontEnd } from '../driver/frontend.js';
import { bit, PF } from '../driver/wire.js';
const d = await FuzzDaemon.start();
async function attempt(name: string, kickFd: number, fileSize: number, regionSize: bigint) {
  const fe = await FrontEnd.connect(d.socket);
  fe.timeoutMs = 2000;
  try {
    const f = await fe.getFeatures();
    await fe.getProtocolFeatures();
    await fe.setProtocolFeatures(bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG));
    await fe.setOwner();
    await fe.setFeatures(f & ~(1n << 34n));
    const m = native.memfdCreate('x', 1);
    ftruncateSync(m, fileSize);
    const uva = 0x7000_0000_0000n;
    await fe.setMemTable([{ guestPhysAddr: 0n, memorySize: regionSize, userspaceAddr: uva, mmapOffset: 0n, fd: m }]);
    native.close(m);
    await fe.setVringNum(0, 64);
    await fe.setVringBase(0, 0);
    const at = uva + regionSize - 65536n;
    await fe.setVringAddr({ index: 0, desc: at, avail: at + 4096n, used: at + 8192n });
    await fe.setVringKick(0, kickFd);
    await fe.setVringEnable(0, true);
    console.log(name, 'queue num', await fe.getQueueNum());
  } catch (e) { console.log(name, 'error', (e as Error).message.split('\n')[0]); }
  fe.close();
  await new Promise((r) => setTimeout(r, 200));
  console.log(name, 'exited?', d.exitInfo, d.log.problems.slice(0, 3));
}
await attempt('devnull kick', openSync('/dev/null', 'r'), 1 << 20, 1n << 20n);
await attempt('memfd past EOF', native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), 65536, 1n << 20n);
console.log(d.log.recent(10));
await d.stop();
