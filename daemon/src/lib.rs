//! `outpostd`: an offline sentinel. Sources (camera, microphone) feed gates (motion, sound level)
//! whose events a sink publishes over MQTT. See ARCHITECTURE.md for the map.

pub mod analysis;
pub mod bench;
pub mod broker;
pub mod capture;
pub mod command;
pub mod config;
pub mod demo;
pub mod event;
pub mod gate;
pub mod home_assistant;
pub mod media;
pub mod model;
pub mod outbox;
pub mod pipeline;
pub mod probe;
pub mod publish;
pub mod queue;
pub mod report;
pub mod service;
pub mod supervision;
pub mod tls;
