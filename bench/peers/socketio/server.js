// bench/peers/socketio: a Socket.IO server as people write it, for bench/run. Clients
// connect over WebSocket only and emit "join" with a channel name (acknowledged once they are
// in the room); POST /pub/<channel> emits event "m" with the body (a string) to that room.
// Prints "listening on http://HOST:PORT" once it accepts connections. PORT=0: any free port.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url.startsWith('/pub/')) {
    const channel = req.url.slice(5);
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      io.to(channel).emit('m', Buffer.concat(chunks).toString());
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': 2 });
      res.end('{}');
    });
    return;
  }
  // Socket.IO answers its own path; everything else is not found.
  if (!req.url.startsWith('/socket.io/')) {
    res.writeHead(404, { 'Content-Length': 0 });
    res.end();
  }
});

const io = new Server(server, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
});
io.on('connection', (socket) => {
  socket.on('join', (channel, ack) => {
    if (typeof channel === 'string') socket.join(channel);
    if (typeof ack === 'function') ack('ok');
  });
});

server.listen(Number(process.env.PORT || 0), process.env.HOST || '127.0.0.1', () => {
  const { address, port } = server.address();
  console.log(`socketio listening on http://${address}:${port}`);
});
