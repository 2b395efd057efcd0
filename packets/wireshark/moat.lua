-- moat.lua: Wireshark/tshark dissector for MOAT's own wire formats.
--
-- Everything RFC 5944 defines (registration, advertisements, GRE) Wireshark already dissects;
-- this script adds only what MOAT defines on top (docs/architecture.md, section 2.2):
--
--  * the NVSE sub-types under Vendor-ID 32473, through the "mip.nvse_ext" dissector table of
--    packet-mip.c. That table hands the sub-dissector a tvb that starts at the 2-byte
--    Vendor-NVSE-Type (reserved and Vendor-ID are already shown by packet-mip.c) and runs to
--    the end of the extension; verified with tshark 4.0.
--      1 care-of-name  value: UTF-8 name
--      2 object part   value: role(1) reserved(1) part-id(2) parent-name(UTF-8)
--  * the MOAT control framing on UDP and TCP ports 4340 (control) and 4341 (service):
--      magic "MO"(2) version(1) type(1) txid(4) length(4) JSON body(length)
--    The body goes to Wireshark's own "json" dissector, so json.* fields work in filters.
--    On TCP, dissect_tcp_pdus() does the framing (several messages per segment, or one
--    message over several segments).
--
-- The numbers mirror packets/codes.py (the reference); tests/unit/test_lua_dissector.py
-- checks this file against it.
--
-- Use: tshark -X lua_script:packets/wireshark/moat.lua -r capture.pcap
--      or copy into ~/.local/lib/wireshark/plugins/

local MOAT_VENDOR_ID = 32473
local CONTROL_PORT = 4340
local SERVICE_PORT = 4341
local HEADER_LEN = 12
local MAGIC = "MO"

local nvse_types = {
    [1] = "care_of_name",
    [2] = "object_part",
    [3] = "gre_key",
    [4] = "mobile_network",
}

local part_roles = {
    [0] = "primary",
    [1] = "duplicate",
    [2] = "secondary",
}

local control_types = {
    [0] = "error",
    [1] = "provision",
    [2] = "provision_reply",
    [3] = "lease_request",
    [4] = "lease_grant",
    [5] = "lease_renew",
    [6] = "lease_cancel",
    [7] = "service_request",
    [8] = "service_reply",
    [9] = "migrate",
    [10] = "state_transfer",
    [11] = "vm_negotiate",
    [12] = "vm_offer",
    [13] = "broker_advert",
    [14] = "broker_solicit",
    [15] = "service_register",
    [16] = "service_deregister",
    [17] = "lease_revoke",
    [18] = "service_list",
    [19] = "service_grow",
    [20] = "instance_release",
}

---------------------------------------------------------------------------------------------
-- NVSE sub-types (Vendor-ID 32473)
---------------------------------------------------------------------------------------------

local moat_nvse = Proto("moat.nvse", "MOAT Vendor-Specific Extension")

local nf = {
    type = ProtoField.uint16("moat.nvse.type", "MOAT NVSE type", base.DEC, nvse_types),
    care_of_name = ProtoField.string("moat.nvse.care_of_name", "Care-of-name", base.UNICODE),
    role = ProtoField.uint8("moat.nvse.part.role", "Role", base.DEC, part_roles),
    part_reserved = ProtoField.uint8("moat.nvse.part.reserved", "Reserved", base.HEX),
    part_id = ProtoField.uint16("moat.nvse.part.part_id", "Part id", base.DEC),
    parent = ProtoField.string("moat.nvse.part.parent", "Parent object", base.UNICODE),
    gre_key = ProtoField.uint32("moat.nvse.gre_key", "GRE key (binding id)", base.DEC),
    prefix = ProtoField.ipv4("moat.nvse.mobile_network.prefix", "Mobile network prefix"),
    prefix_len = ProtoField.uint8("moat.nvse.mobile_network.length", "Prefix length", base.DEC),
    value = ProtoField.bytes("moat.nvse.value", "Value"),
}
moat_nvse.fields = {
    nf.type, nf.care_of_name, nf.role, nf.part_reserved, nf.part_id, nf.parent, nf.gre_key,
    nf.prefix, nf.prefix_len, nf.value,
}

local ef_nvse_short = ProtoExpert.new(
    "moat.nvse.too_short", "MOAT NVSE value too short", expert.group.MALFORMED, expert.severity.ERROR)
local ef_nvse_unknown = ProtoExpert.new(
    "moat.nvse.unknown_type", "Unknown MOAT NVSE type", expert.group.UNDECODED, expert.severity.NOTE)
moat_nvse.experts = { ef_nvse_short, ef_nvse_unknown }

function moat_nvse.dissector(tvb, pinfo, tree)
    local len = tvb:len()
    if len < 2 then
        return 0 -- let packet-mip.c show the raw Vendor Type/Value
    end
    local subtree = tree:add(moat_nvse, tvb())
    local nvse_type = tvb(0, 2):uint()
    subtree:add(nf.type, tvb(0, 2))
    if nvse_type == 1 then
        if len > 2 then
            subtree:add(nf.care_of_name, tvb(2), tvb(2):string(ENC_UTF_8))
            subtree:append_text(": care-of-name " .. tvb(2):string(ENC_UTF_8))
        else
            subtree:add_proto_expert_info(ef_nvse_short, "empty care-of-name")
        end
    elseif nvse_type == 2 then
        if len < 6 then
            subtree:add_proto_expert_info(ef_nvse_short, "object part needs 4 bytes after the type")
            return len
        end
        subtree:add(nf.role, tvb(2, 1))
        subtree:add(nf.part_reserved, tvb(3, 1))
        subtree:add(nf.part_id, tvb(4, 2))
        local role = part_roles[tvb(2, 1):uint()] or "?"
        local text = ": " .. role .. " part " .. tvb(4, 2):uint()
        if len > 6 then
            subtree:add(nf.parent, tvb(6), tvb(6):string(ENC_UTF_8))
            text = text .. " of " .. tvb(6):string(ENC_UTF_8)
        end
        subtree:append_text(text)
    elseif nvse_type == 3 then
        if len ~= 6 then
            subtree:add_proto_expert_info(ef_nvse_short, "GRE key needs 4 bytes after the type")
            return len
        end
        subtree:add(nf.gre_key, tvb(2, 4))
        subtree:append_text(": GRE key " .. tvb(2, 4):uint())
    elseif nvse_type == 4 then
        if len ~= 7 then
            subtree:add_proto_expert_info(ef_nvse_short, "mobile network needs 5 bytes after the type")
            return len
        end
        subtree:add(nf.prefix, tvb(2, 4))
        subtree:add(nf.prefix_len, tvb(6, 1))
        subtree:append_text(": mobile network " .. tostring(tvb(2, 4):ipv4()) .. "/" .. tvb(6, 1):uint())
    else
        if len > 2 then
            subtree:add(nf.value, tvb(2))
        end
        subtree:add_proto_expert_info(ef_nvse_unknown)
    end
    return len
end

DissectorTable.get("mip.nvse_ext"):add(MOAT_VENDOR_ID, moat_nvse)

---------------------------------------------------------------------------------------------
-- Control framing (UDP/TCP 4340, 4341)
---------------------------------------------------------------------------------------------

local moat = Proto("moat", "MOAT Control")

local cf = {
    magic = ProtoField.string("moat.magic", "Magic"),
    version = ProtoField.uint8("moat.version", "Version", base.DEC),
    type = ProtoField.uint8("moat.type", "Type", base.DEC, control_types),
    txid = ProtoField.uint32("moat.txid", "Transaction id", base.DEC),
    length = ProtoField.uint32("moat.length", "Body length", base.DEC),
    body = ProtoField.string("moat.body", "Body", base.UNICODE),
}
moat.fields = { cf.magic, cf.version, cf.type, cf.txid, cf.length, cf.body }

local ef_bad_magic = ProtoExpert.new(
    "moat.bad_magic", "Not a MOAT control message (bad magic)", expert.group.MALFORMED,
    expert.severity.ERROR)
local ef_truncated = ProtoExpert.new(
    "moat.truncated", "MOAT body shorter than its length field", expert.group.MALFORMED,
    expert.severity.ERROR)
local ef_version = ProtoExpert.new(
    "moat.bad_version", "Unsupported MOAT control version", expert.group.PROTOCOL,
    expert.severity.WARN)
moat.experts = { ef_bad_magic, ef_truncated, ef_version }

local json_dissector = Dissector.get("json")

-- Dissect one message at the start of tvb; return the bytes it used.
local function dissect_message(tvb, pinfo, tree)
    local len = tvb:len()
    local declared = tvb(8, 4):uint()
    local total = HEADER_LEN + declared
    local used = math.min(total, len)
    local subtree = tree:add(moat, tvb(0, used))
    subtree:add(cf.magic, tvb(0, 2))
    local vitem = subtree:add(cf.version, tvb(2, 1))
    if tvb(2, 1):uint() ~= 1 then
        vitem:add_proto_expert_info(ef_version)
    end
    subtree:add(cf.type, tvb(3, 1))
    subtree:add(cf.txid, tvb(4, 4))
    subtree:add(cf.length, tvb(8, 4))

    local mtype = tvb(3, 1):uint()
    local name = control_types[mtype] or ("type " .. mtype)
    local txid = tvb(4, 4):uint()
    subtree:append_text(", " .. name .. ", txid " .. txid)
    pinfo.cols.protocol = "MOAT"
    local summary = name .. " txid=" .. txid
    if tostring(pinfo.cols.info) == "" then
        pinfo.cols.info:set(summary)
    else
        pinfo.cols.info:append("; " .. summary)
    end

    if declared > 0 then
        local avail = math.min(declared, len - HEADER_LEN)
        if avail < declared then
            subtree:add_proto_expert_info(ef_truncated)
        end
        if avail > 0 then
            local body = tvb(HEADER_LEN, avail)
            subtree:add(cf.body, body, body:string(ENC_UTF_8))
            -- Wireshark's JSON dissector: json.member, json.value.* etc. become filterable.
            -- It also rewrites the Protocol and Info columns; put ours back.
            local info = tostring(pinfo.cols.info)
            json_dissector:call(body:tvb(), pinfo, subtree)
            pinfo.cols.protocol = "MOAT"
            pinfo.cols.info:set(info)
        end
    end
    return used
end

local function has_magic(tvb, offset)
    return tvb:len() - offset >= 2 and tvb(offset, 2):string() == MAGIC
end

-- UDP: one datagram carries one message (MOAT's codec rejects trailing bytes; show them).
function moat.dissector(tvb, pinfo, tree)
    if tvb:len() < HEADER_LEN or not has_magic(tvb, 0) then
        return 0 -- not ours: let Wireshark fall back to "data"
    end
    pinfo.cols.info:clear()
    local offset = 0
    while tvb:len() - offset >= HEADER_LEN and has_magic(tvb, offset) do
        offset = offset + dissect_message(tvb(offset):tvb(), pinfo, tree)
    end
    if offset < tvb:len() then
        local extra = tree:add(moat, tvb(offset), "Trailing bytes")
        extra:add_proto_expert_info(ef_bad_magic)
    end
    return tvb:len()
end

-- TCP: a stream of messages; dissect_tcp_pdus() asks for more segments when one is cut.
-- A separate Proto only because a dissector table entry needs one; every field it shows
-- belongs to "moat".
local moat_tcp = Proto("moat.tcp", "MOAT Control over TCP")

local function tcp_pdu_len(tvb, pinfo, offset)
    if not has_magic(tvb, offset) then
        return tvb:len() - offset -- out of sync: swallow the rest rather than misframe
    end
    return HEADER_LEN + tvb(offset + 8, 4):uint()
end

local function tcp_pdu(tvb, pinfo, tree)
    if not has_magic(tvb, 0) or tvb:len() < HEADER_LEN then
        local item = tree:add(moat, tvb(), "MOAT (unframed data)")
        item:add_proto_expert_info(ef_bad_magic)
        return tvb:len()
    end
    return dissect_message(tvb, pinfo, tree)
end

function moat_tcp.dissector(tvb, pinfo, tree)
    if not has_magic(tvb, 0) then
        return 0
    end
    pinfo.cols.info:clear()
    dissect_tcp_pdus(tvb, tree, HEADER_LEN, tcp_pdu_len, tcp_pdu)
    return tvb:len()
end

local udp_table = DissectorTable.get("udp.port")
local tcp_table = DissectorTable.get("tcp.port")
for _, port in ipairs({ CONTROL_PORT, SERVICE_PORT }) do
    udp_table:add(port, moat)
    tcp_table:add(port, moat_tcp)
end
