// Preloaded into the Portkey gateway by bench/bench_gateways.py (`node --import`): its
// start-server.js listens on every interface, at the --port= it is given. Every server the
// bench starts binds 127.0.0.1, so the address is forced here; with --port=0 the gateway gets
// an ephemeral port, which the bench reads from /proc.
import net from "node:net";

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (port, host, ...rest) {
  if (typeof host === "function") rest.unshift(host);
  return listen.call(this, port, "127.0.0.1", ...rest);
};
