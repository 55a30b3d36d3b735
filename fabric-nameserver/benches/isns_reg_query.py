#!/usr/bin/env python3
# Raw iSNSP load: N durable registrations (entity + target node + portal each) on one
# connection, then single-name queries. Usage: isns_reg_query.py PORT N PREFIX
# (against a running strata-nameserver or isnsd; isns-bench.rs beside it is the full benchmark)
import socket,struct,sys,time
def tlv(t,v): 
    v=v+b'\0'*((-len(v))%4); return struct.pack('>II',t,len(v))+v
def s(x): return (x+'\0').encode()
def u32(x): return struct.pack('>I',x)
def pdu(fn,xid,payload,flags=0x8000|0x0400|0x0800): return struct.pack('>HHHHHH',1,fn,len(payload),flags,xid,0)+payload
def recv(sock):
    out=b''
    while True:
        h=b''
        while len(h)<12: h+=sock.recv(12-len(h))
        _,fn,l,fl,xid,seq=struct.unpack('>HHHHHH',h)
        p=b''
        while len(p)<l: p+=sock.recv(l-len(p))
        out+=p
        if fl&0x0800: return struct.unpack('>I',out[:4])[0], out
port=int(sys.argv[1]); n=int(sys.argv[2]); prefix=sys.argv[3]
c=socket.create_connection(('127.0.0.1',port)); c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
ip=b'\0'*10+b'\xff\xff'+bytes([127,0,0,1])
t=time.time()
for i in range(n):
    name=f'iqn.2024-01.{prefix}:n{i}'
    p=tlv(32,s(name))+tlv(0,b'')+tlv(1,s(f'{prefix}-e{i}'))+tlv(2,u32(2))+tlv(32,s(name))+tlv(33,u32(1))+tlv(16,ip)+tlv(17,u32(i+1))
    c.sendall(pdu(1,i&0xffff,p)); st,_=recv(c); assert st==0,st
dt=time.time()-t; print(f'{n} registrations in {dt:.2f}s = {n/dt:.0f}/s')
t=time.time(); q=0
for i in range(0,n,max(1,n//1000)):
    name=f'iqn.2024-01.{prefix}:n{i}'
    p=tlv(32,s(name))+tlv(32,s(name))+tlv(0,b'')+tlv(33,b'')
    c.sendall(pdu(2,i&0xffff,p)); st,_=recv(c); assert st==0,st; q+=1
dt=time.time()-t; print(f'{q} single-name queries in {dt:.2f}s = {q/dt:.0f}/s')
