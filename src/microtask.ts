// Work for the end of the current callback, on the data path. Node's
// queueMicrotask wraps every callback in an AsyncResource and a bound function
// (two allocations and async-hook bookkeeping per call, measured at QD 1); a
// settled promise's then() queues the same microtask without them. A throw
// still ends the process, as an unhandled rejection.
const settled = Promise.resolve();

export function microtask(fn: () => void): void {
  void settled.then(fn);
}
